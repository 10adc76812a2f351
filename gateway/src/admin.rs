//! The admin listener (README, "Health and metrics"): `GET /healthz` for load balancers and
//! `GET /metrics` for Prometheus. Off unless `[admin]` is configured;
//! meant for loopback or a private network.

use std::net::SocketAddr;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;

use crate::metrics::{self, Metrics};
use crate::service::{
    Body, Service, get_or_head, method_not_allowed, status_only, text, text_owned,
};

/// The content type of the OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves health and metrics.
pub struct Admin {
    registry: Registry,
}

impl Admin {
    pub fn new(metrics: &'static Metrics) -> Self {
        Self {
            registry: Metrics::registry(metrics),
        }
    }
}

impl Service for Admin {
    async fn call(&'static self, request: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        let path = request.uri().path();
        if path != "/healthz" && path != "/metrics" {
            return status_only(StatusCode::NOT_FOUND);
        }
        let Some(with_body) = get_or_head(request.method()) else {
            return method_not_allowed("GET, HEAD");
        };
        if path == "/healthz" {
            return text(StatusCode::OK, "ok", with_body);
        }
        let mut response = text_owned(StatusCode::OK, metrics::encode(&self.registry));
        if !with_body {
            *response.body_mut() = Body::default();
        }
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
        response
    }
}
