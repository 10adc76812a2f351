//! README, "Health and metrics": the admin listener's health check and metrics, which must
//! equal the traffic that was sent.

mod common;

use std::time::Duration;

use common::{
    Backend, Behaviour, Client, GatewayConfig, TestUpstream, Threading, raw_exchange, request,
};
use http::StatusCode;

async fn metrics_equal_the_traffic_sent(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .with_admin()
        .start();
    let public = gateway.addr("public");
    let admin = gateway.addr("admin");

    let mut client = Client::connect(public).await;
    for _ in 0..5 {
        assert_eq!(client.get("/").await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        let answer = client.send(request("HEAD", "/")).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(client.get("/nope").await.status, StatusCode::NOT_FOUND);
    }
    for _ in 0..2 {
        let answer = client.send(request("POST", "/")).await.unwrap();
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    }
    upstream.set(Behaviour::Status(500));
    for _ in 0..2 {
        assert_eq!(client.get("/").await.status, StatusCode::BAD_GATEWAY);
    }
    for bad in [&b"GARBAGE\r\n\r\n"[..], b"GET / HTTP/1.1\r\nhost x\r\n\r\n"] {
        let reply = raw_exchange(public, bad, Duration::from_secs(5)).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }
    drop(client);

    let health = common::get(admin, "/healthz").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (StatusCode::OK, "ok")
    );

    let page = common::get(admin, "/metrics").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        page.headers
    );
    let m = common::scrape(admin).await;
    let get = |key: &str| *m.get(key).unwrap_or_else(|| panic!("no {key} in {m:?}"));
    assert_eq!(
        get(r#"gateway_requests_total{protocol="http/1.1",status="200"}"#),
        7.0
    );
    assert_eq!(
        get(r#"gateway_requests_total{protocol="http/1.1",status="404"}"#),
        3.0
    );
    assert_eq!(
        get(r#"gateway_requests_total{protocol="http/1.1",status="405"}"#),
        2.0
    );
    assert_eq!(
        get(r#"gateway_requests_total{protocol="http/1.1",status="502"}"#),
        2.0
    );
    assert_eq!(
        get(r#"gateway_requests_total{protocol="http/1.1",status="503"}"#),
        0.0
    );
    assert_eq!(
        get(r#"gateway_requests_total{protocol="http/1.1",status="504"}"#),
        0.0
    );
    assert_eq!(get("gateway_bad_requests_total"), 2.0);
    assert_eq!(get(r#"gateway_upstream_requests_total{outcome="ok"}"#), 7.0);
    assert_eq!(
        get(r#"gateway_upstream_requests_total{outcome="error"}"#),
        2.0
    );
    assert_eq!(
        get(r#"gateway_upstream_requests_total{outcome="timeout"}"#),
        0.0
    );
    assert_eq!(
        get(r#"gateway_upstream_requests_total{outcome="overloaded"}"#),
        0.0
    );
    assert_eq!(get("gateway_request_duration_seconds_count"), 14.0);
    assert_eq!(
        get(r#"gateway_request_duration_seconds_bucket{le="+Inf"}"#),
        14.0
    );
    assert_eq!(get("gateway_upstream_duration_seconds_count"), 9.0);
    assert_eq!(
        get(r#"gateway_upstream_duration_seconds_bucket{le="+Inf"}"#),
        9.0
    );
    assert!(get("gateway_upstream_duration_seconds_sum") > 0.0);
    assert_eq!(get("gateway_upstream_connections_open"), 1.0);
    let build = format!(
        r#"gateway_build_info{{version="{}",backend="{}",workers="2"}}"#,
        env!("CARGO_PKG_VERSION"),
        backend.name()
    );
    assert_eq!(get(&build), 1.0);
    assert_eq!(upstream.posts(), 9);

    // The gauge follows the open public connections.
    let _held: Vec<Client> = futures_held(public, 3).await;
    let m = common::scrape(admin).await;
    assert_eq!(m[r#"gateway_connections_open{protocol="http/1.1"}"#], 3.0);

    assert_eq!(
        common::get(admin, "/other").await.status,
        StatusCode::NOT_FOUND
    );
}

async fn futures_held(addr: std::net::SocketAddr, n: usize) -> Vec<Client> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut client = Client::connect(addr).await;
        assert_eq!(client.get("/nope").await.status, StatusCode::NOT_FOUND);
        held.push(client);
    }
    held
}

async fn per_core_metrics_add_up_every_worker(backend: Backend) {
    // 16 visits at once, each holding an upstream connection for 200 ms,
    // on two per-core workers, each with a pool of its own.
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(200))).await;
    let gateway = GatewayConfig::new(backend, upstream.addr)
        .workers(2)
        .threading(Threading::PerCore)
        .with_admin()
        .start();
    let public = gateway.addr("public");
    let mut visits = tokio::task::JoinSet::new();
    for _ in 0..16 {
        visits.spawn(common::get(public, "/"));
    }
    while let Some(answer) = visits.join_next().await {
        assert_eq!(answer.unwrap().status, StatusCode::OK);
    }
    let m = common::scrape(gateway.addr("admin")).await;
    assert_eq!(
        m[r#"gateway_requests_total{protocol="http/1.1",status="200"}"#],
        16.0
    );
    assert_eq!(m[r#"gateway_upstream_requests_total{outcome="ok"}"#], 16.0);
    assert_eq!(upstream.posts(), 16);
    assert_eq!(
        m["gateway_upstream_connections_open"],
        upstream.connections() as f64,
        "the pools' connections, summed"
    );
}

async fn admin_listener_is_off_unless_configured(backend: Backend) {
    let upstream = TestUpstream::start(Behaviour::Ok).await;
    let gateway = GatewayConfig::new(backend, upstream.addr).start();
    assert!(
        gateway.listeners.iter().all(|(name, _)| name != "admin"),
        "{:?}",
        gateway.listeners
    );
}

both_backends!(
    metrics_equal_the_traffic_sent,
    per_core_metrics_add_up_every_worker,
    admin_listener_is_off_unless_configured
);
