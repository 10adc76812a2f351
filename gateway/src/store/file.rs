//! The file store: the count in a file of two checksummed slots, written
//! in turn, so that a write torn by a crash or a power cut leaves the other
//! slot, one commit older, intact. Each commit writes the next slot in
//! place and `fdatasync`s it; the slot with the highest sequence number
//! and a good checksum is the count. Totals are absolute, never deltas.
//!
//! A slot: the magic `gwcount1`, the sequence number and the total (both
//! u64, little-endian), the CRC-32 of those 24 bytes, four zero bytes.
//!
//! The file is created whole (written to a temporary name, synced, renamed,
//! and the folder synced), so a file that exists is complete: one with no
//! good slot is an error, never a fresh zero. An exclusive lock (`flock`)
//! keeps a second process off it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{CommitError, Durable};

const MAGIC: &[u8; 8] = b"gwcount1";
const SLOT: usize = 32;
const FILE_LEN: u64 = 2 * SLOT as u64;

/// A state file opened, locked and read.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    /// The newest good slot.
    newest: Slot,
}

/// A slot's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    sequence: u64,
    total: u64,
}

impl Slot {
    fn encode(self) -> [u8; SLOT] {
        let mut bytes = [0; SLOT];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.total.to_le_bytes());
        let checksum = crc32fast::hash(&bytes[..24]);
        bytes[24..28].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// The slot in `bytes`, if it is whole and its checksum is right.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; SLOT] = bytes.try_into().ok()?;
        let word = |at: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let checksum = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
        if &bytes[..8] != MAGIC || checksum != crc32fast::hash(&bytes[..24]) {
            return None;
        }
        Some(Slot {
            sequence: word(8),
            total: word(16),
        })
    }
}

/// `error` with the file's path and what was being done.
fn context(path: &Path, doing: &str, error: io::Error) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("{}: {doing}: {error}", path.display()),
    )
}

impl FileStore {
    /// Opens the state file at `path` (creating it, at 0, if it does not
    /// exist), takes its lock and reads the durable total.
    pub fn open(path: &Path) -> io::Result<Self> {
        if !path
            .try_exists()
            .map_err(|e| context(path, "cannot look for it", e))?
        {
            create(path)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| context(path, "cannot open it", e))?;
        use rustix::fs::{FlockOperation, flock};
        flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|errno| {
            if errno == rustix::io::Errno::WOULDBLOCK {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{}: in use by another process (it holds the lock)",
                        path.display()
                    ),
                )
            } else {
                context(path, "cannot lock it", errno.into())
            }
        })?;
        let newest = read_newest(&file, path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            newest,
        })
    }

    /// The durable total.
    pub fn total(&self) -> u64 {
        self.newest.total
    }
}

/// The newest good slot of an open state file; an error naming the file if
/// it has none, or is not the size a state file is.
fn read_newest(file: &File, path: &Path) -> io::Result<Slot> {
    let corrupt = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: not a readable counter state ({why}); restore it from a backup, or remove it to start again from 0",
                path.display()
            ),
        )
    };
    let len = file
        .metadata()
        .map_err(|e| context(path, "cannot read it", e))?
        .len();
    if len != FILE_LEN {
        return Err(corrupt(&format!("{len} bytes, not {FILE_LEN}")));
    }
    let mut bytes = [0; 2 * SLOT];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| context(path, "cannot read it", e))?;
    let slots = [Slot::decode(&bytes[..SLOT]), Slot::decode(&bytes[SLOT..])];
    slots
        .into_iter()
        .flatten()
        .max_by_key(|slot| slot.sequence)
        .ok_or_else(|| corrupt("no slot with a good checksum"))
}

/// Creates the state file at 0: written whole under a temporary name,
/// synced, renamed into place, and the folder synced, so that the name
/// never shows a partial file.
fn create(path: &Path) -> io::Result<()> {
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    // Left by a start that crashed while creating it: never acknowledged.
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            return Err(context(&temporary, "cannot remove it", error));
        }
        _ => {}
    }
    let first = Slot {
        sequence: 1,
        total: 0,
    };
    let mut bytes = [0; 2 * SLOT];
    bytes[..SLOT].copy_from_slice(&first.encode());
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .map_err(|e| context(&temporary, "cannot create it", e))?;
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| context(&temporary, "cannot write it", e))?;
    // Never over a file that appeared meanwhile (another process creating
    // it too): that one may already be open, locked and counting.
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, &temporary, CWD, path, RenameFlags::NOREPLACE) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            return std::fs::remove_file(&temporary)
                .map_err(|e| context(&temporary, "cannot remove it", e));
        }
        Err(errno) => return Err(context(path, "cannot create it", errno.into())),
    }
    File::open(folder)
        .and_then(|folder| folder.sync_all())
        .map_err(|e| context(folder, "cannot sync the folder", e))
}

impl Durable for FileStore {
    fn commit(&mut self, increments: u64) -> Result<u64, CommitError> {
        if increments == 0 {
            return Ok(self.newest.total);
        }
        let total = self.newest.total.checked_add(increments).ok_or_else(|| {
            CommitError::Refused(io::Error::other("the count would pass 2^64 - 1"))
        })?;
        let sequence = self.newest.sequence.checked_add(1).ok_or_else(|| {
            CommitError::Refused(io::Error::other("the state file's sequence is at its end"))
        })?;
        let next = Slot { sequence, total };
        // The slot the newest good one is not; after a refused write the
        // same one again, so the good slot is never the one overwritten.
        let offset = (next.sequence % 2) * SLOT as u64;
        self.file
            .write_all_at(&next.encode(), offset)
            .map_err(CommitError::Refused)?;
        self.file.sync_data().map_err(CommitError::Fatal)?;
        self.newest = next;
        Ok(total)
    }

    fn shared(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(store: &mut FileStore, increments: u64) -> u64 {
        store.commit(increments).unwrap()
    }

    #[test]
    fn a_missing_file_starts_at_0_and_totals_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counter.state");
        let mut store = FileStore::open(&path).unwrap();
        assert_eq!(store.total(), 0);
        assert!(!dir.path().join("counter.state.new").exists());
        for (increments, total) in [(1, 1), (4, 5), (1, 6), (0, 6)] {
            assert_eq!(commit(&mut store, increments), total);
        }
        drop(store);
        assert_eq!(FileStore::open(&path).unwrap().total(), 6);
    }

    #[test]
    fn a_torn_slot_leaves_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counter.state");
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 7);
        commit(&mut store, 2);
        let newest_offset = (store.newest.sequence % 2) * SLOT as u64;
        drop(store);
        // Half of the newest slot reached the disk.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 12], newest_offset + 10).unwrap();
        assert_eq!(FileStore::open(&path).unwrap().total(), 7);
    }

    #[test]
    fn a_file_with_no_good_slot_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counter.state");
        for contents in [&[][..], &[0u8; 64][..], b"12345\n", &[0u8; 65][..]] {
            std::fs::write(&path, contents).unwrap();
            let error = FileStore::open(&path).unwrap_err().to_string();
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(error.contains("not a readable counter state"), "{error}");
        }
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counter.state");
        let _held = FileStore::open(&path).unwrap();
        let error = FileStore::open(&path).unwrap_err().to_string();
        assert!(error.contains("in use by another process"), "{error}");
    }
}
