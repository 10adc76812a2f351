//! The file store: the count in a file of two checksummed slots, written
//! in turn, so that a write torn by a crash or a power cut leaves the other
//! slot, one commit older, intact. Each commit writes the slot that does
//! not hold the newest good one, in place, and `fdatasync`s it; the slot
//! with the highest sequence number and a good checksum is the count.
//! Totals are absolute, never deltas.
//!
//! A slot: the magic `gwcount1`, the sequence number and the total (both
//! u64, little-endian), the CRC-32 of those 24 bytes, four zero bytes.
//!
//! The file is created whole (written under a temporary name of its own,
//! synced, renamed into place unless something took the name meanwhile,
//! and the folder synced), so a file that exists is complete: one with no
//! good slot is an error, never a fresh zero. The temporary name is drawn
//! at random and the file made exclusively, so the store only ever removes
//! a file it made itself in this process; a crash while creating leaves a
//! hidden `.NAME.*.tmp` file behind, which nothing reads. An exclusive lock
//! (`flock`), taken before the file has its name, keeps a second process
//! off it. A file removed or moved away while the counter holds it is
//! noticed at the next commit and written again at its path, with the
//! count it held, rather than left to take later commits with it. Made by
//! the counter, the file is readable by its owner alone.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{CommitError, Durable};

const MAGIC: &[u8; 8] = b"gwcount1";
const SLOT: usize = 32;
const FILE_LEN: u64 = 2 * SLOT as u64;
/// What a new state file holds.
const FIRST: Slot = Slot {
    sequence: 1,
    total: 0,
};

/// A state file opened, locked and read.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    /// The newest good slot.
    newest: Slot,
    /// Which slot (0 or 1) holds `newest`: the next commit writes the
    /// other, so the good slot is never the one overwritten, whatever its
    /// sequence number (a file made with its first slot in either place).
    newest_at: usize,
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
            // Another process may create it meanwhile: then that one is
            // opened, and its lock says whether it is in use.
            if let Some(file) = create(path, FIRST)? {
                return Ok(Self {
                    file,
                    path: path.to_owned(),
                    newest: FIRST,
                    newest_at: 0,
                });
            }
        }
        let file = open_locked(path)?;
        let (newest, newest_at) = read_newest(&file, path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            newest,
            newest_at,
        })
    }

    /// The durable total.
    pub fn total(&self) -> u64 {
        self.newest.total
    }

    /// Makes sure the open file is still the one at its path. Removed or
    /// moved away (an operator's `rm` or `mv`, a cleaner of old files),
    /// every later commit would go into a file the next start does not
    /// read, and it would begin at 0: so the file is written again at its
    /// path with the count it holds. Replaced by another file, that file is
    /// not this count's: commits are refused until a restart reads it.
    fn keep_named(&mut self) -> io::Result<()> {
        let held = self
            .file
            .metadata()
            .map_err(|e| context(&self.path, "cannot read it", e))?;
        let replaced = || {
            io::Error::other(format!(
                "{}: replaced by another file while this counter held it (whose count was {}); restart the counter to read the new one",
                self.path.display(),
                self.newest.total
            ))
        };
        match std::fs::metadata(&self.path) {
            Ok(named) if (named.dev(), named.ino()) == (held.dev(), held.ino()) => Ok(()),
            Ok(_) => Err(replaced()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let Some(file) = create(&self.path, self.newest)? else {
                    return Err(replaced());
                };
                self.file = file;
                self.newest_at = 0;
                tracing::warn!(
                    path = %self.path.display(),
                    total = self.newest.total,
                    "the state file was removed or moved while the counter held it; written again with its count"
                );
                Ok(())
            }
            Err(error) => Err(context(&self.path, "cannot look for it", error)),
        }
    }
}

/// Opens the state file and takes its lock.
fn open_locked(path: &Path) -> io::Result<File> {
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
    Ok(file)
}

/// The newest good slot of an open state file, and which slot it is; an
/// error naming the file if it has none, or is not the size a state file
/// is.
fn read_newest(file: &File, path: &Path) -> io::Result<(Slot, usize)> {
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
        .enumerate()
        .filter_map(|(at, slot)| Some((slot?, at)))
        .max_by_key(|(slot, _)| slot.sequence)
        .ok_or_else(|| corrupt("no slot with a good checksum"))
}

/// Creates the state file holding `first` in its first slot: written whole
/// under a temporary name of its own, synced, locked, renamed into place,
/// and the folder synced, so that the name never shows a partial file nor
/// an unlocked one. The file, open and locked; `None`, and nothing
/// changed, if a file took the name meanwhile (another process creating
/// it too: that one may already be open, locked and counting). The
/// temporary file is removed on every way out but a crash.
fn create(path: &Path, first: Slot) -> io::Result<Option<File>> {
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    // Hidden, and named after the state file, for an operator who finds
    // one left by a crash.
    let mut prefix = OsString::from(".");
    prefix.push(path.file_name().unwrap_or_else(|| "counter.state".as_ref()));
    prefix.push(".");
    let temporary = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(folder)
        .map_err(|e| context(folder, "cannot create a state file in it", e))?;
    let mut bytes = [0; 2 * SLOT];
    bytes[..SLOT].copy_from_slice(&first.encode());
    temporary
        .as_file()
        .write_all_at(&bytes, 0)
        .and_then(|()| temporary.as_file().sync_all())
        .map_err(|e| context(path, "cannot create it", e))?;
    use rustix::fs::{FlockOperation, flock};
    flock(
        temporary.as_file(),
        FlockOperation::NonBlockingLockExclusive,
    )
    .map_err(|errno| context(temporary.path(), "cannot lock it", errno.into()))?;
    let file = match temporary.persist_noclobber(path) {
        Ok(file) => file,
        Err(error) if error.error.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(error) => return Err(context(path, "cannot create it", error.error)),
    };
    File::open(folder)
        .and_then(|folder| folder.sync_all())
        .map_err(|e| context(folder, "cannot sync the folder", e))?;
    Ok(Some(file))
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
        self.keep_named().map_err(CommitError::Refused)?;
        let next = Slot { sequence, total };
        // After a refused write the same slot again: the good one is never
        // the one overwritten.
        let next_at = 1 - self.newest_at;
        self.file
            .write_all_at(&next.encode(), (next_at * SLOT) as u64)
            .map_err(CommitError::Refused)?;
        self.file.sync_data().map_err(CommitError::Fatal)?;
        self.newest = next;
        self.newest_at = next_at;
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

    /// A folder of its own, and where a state file in it goes.
    fn fresh() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counter.state");
        (dir, path)
    }

    fn commit(store: &mut FileStore, increments: u64) -> u64 {
        store.commit(increments).unwrap()
    }

    fn names_in(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Tears the slot holding `sequence` in the file at `path`, as a write
    /// cut short by a crash would: 16 bytes of it overwritten.
    fn tear_slot_of(path: &Path, sequence: u64) {
        let bytes = std::fs::read(path).unwrap();
        let at = (0..2)
            .find(|&at| {
                Slot::decode(&bytes[at * SLOT..(at + 1) * SLOT]).map(|s| s.sequence)
                    == Some(sequence)
            })
            .unwrap();
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&[0xa5; 16], (at * SLOT + 8) as u64)
            .unwrap();
    }

    #[test]
    fn a_missing_file_starts_at_0_and_totals_survive_reopening() {
        let (dir, path) = fresh();
        let mut store = FileStore::open(&path).unwrap();
        assert_eq!(store.total(), 0);
        assert_eq!(names_in(dir.path()), ["counter.state"], "nothing else left");
        for (increments, total) in [(1, 1), (4, 5), (1, 6), (0, 6)] {
            assert_eq!(commit(&mut store, increments), total);
        }
        drop(store);
        assert_eq!(FileStore::open(&path).unwrap().total(), 6);
    }

    #[test]
    fn a_torn_slot_leaves_the_one_before() {
        let (_dir, path) = fresh();
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 7);
        commit(&mut store, 2);
        let newest_offset = (store.newest_at * SLOT) as u64;
        drop(store);
        // Half of the newest slot reached the disk.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 12], newest_offset + 10).unwrap();
        assert_eq!(FileStore::open(&path).unwrap().total(), 7);
    }

    #[test]
    fn the_first_commit_keeps_the_slot_the_file_was_made_with() {
        let (_dir, path) = fresh();
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 3);
        drop(store);
        tear_slot_of(&path, 2);
        assert_eq!(FileStore::open(&path).unwrap().total(), 0);
    }

    #[test]
    fn commits_alternate_from_a_file_whose_first_slot_is_the_second() {
        let (_dir, path) = fresh();
        let mut bytes = [0; 2 * SLOT];
        bytes[SLOT..].copy_from_slice(
            &Slot {
                sequence: 5,
                total: 9,
            }
            .encode(),
        );
        std::fs::write(&path, bytes).unwrap();
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 1);
        drop(store);
        tear_slot_of(&path, 6);
        assert_eq!(FileStore::open(&path).unwrap().total(), 9);
    }

    #[test]
    fn files_of_other_names_beside_it_are_left_alone() {
        let (dir, path) = fresh();
        // What an earlier version took for its own temporary file, and a
        // name like the ones this one draws.
        let others = ["counter.state.new", ".counter.state.abcdef.tmp"];
        for other in others {
            std::fs::write(dir.path().join(other), other).unwrap();
        }
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 1);
        for other in others {
            assert_eq!(
                std::fs::read(dir.path().join(other)).unwrap(),
                other.as_bytes()
            );
        }
        assert_eq!(names_in(dir.path()).len(), 3);
    }

    #[test]
    fn a_file_removed_while_held_is_written_again_with_its_count() {
        let (dir, path) = fresh();
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 3);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(commit(&mut store, 2), 5);
        assert_eq!(commit(&mut store, 1), 6);
        // The new file is locked by the store, as the first was.
        let error = FileStore::open(&path).unwrap_err().to_string();
        assert!(error.contains("in use by another process"), "{error}");
        drop(store);
        assert_eq!(FileStore::open(&path).unwrap().total(), 6);
        assert_eq!(names_in(dir.path()), ["counter.state"]);
    }

    #[test]
    fn a_file_moved_away_while_held_is_written_again_and_the_moved_one_kept() {
        let (dir, path) = fresh();
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 3);
        let moved = dir.path().join("counter.state.old");
        std::fs::rename(&path, &moved).unwrap();
        assert_eq!(commit(&mut store, 2), 5);
        drop(store);
        assert_eq!(FileStore::open(&path).unwrap().total(), 5);
        assert_eq!(FileStore::open(&moved).unwrap().total(), 3);
    }

    #[test]
    fn a_file_replaced_while_a_link_keeps_it_refuses_commits() {
        let (dir, path) = fresh();
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 3);
        std::fs::hard_link(&path, dir.path().join("backup")).unwrap();
        let restored = dir.path().join("restored");
        drop(FileStore::open(&restored).unwrap());
        std::fs::rename(&restored, &path).unwrap();
        let error = match store.commit(1) {
            Err(CommitError::Refused(error)) => error.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(error.contains("replaced by another file"), "{error}");
    }

    #[test]
    fn a_file_replaced_while_held_refuses_commits_and_is_kept() {
        let (dir, path) = fresh();
        let mut store = FileStore::open(&path).unwrap();
        commit(&mut store, 3);
        let restored = dir.path().join("restored");
        drop(FileStore::open(&restored).unwrap());
        std::fs::rename(&restored, &path).unwrap();
        let error = match store.commit(1) {
            Err(CommitError::Refused(error)) => error.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(error.contains("replaced by another file"), "{error}");
        drop(store);
        assert_eq!(FileStore::open(&path).unwrap().total(), 0);
    }

    #[test]
    fn a_file_with_no_good_slot_is_an_error_naming_it() {
        let (_dir, path) = fresh();
        for contents in [&[][..], &[0u8; 64][..], b"12345\n", &[0u8; 65][..]] {
            std::fs::write(&path, contents).unwrap();
            let error = FileStore::open(&path).unwrap_err().to_string();
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(error.contains("not a readable counter state"), "{error}");
        }
    }

    #[test]
    fn a_second_opener_is_refused() {
        let (_dir, path) = fresh();
        let _held = FileStore::open(&path).unwrap();
        let error = FileStore::open(&path).unwrap_err().to_string();
        assert!(error.contains("in use by another process"), "{error}");
    }
}
