//! `tsq serve RUN_DIR`: a finished run behind an OpenAI-compatible HTTP API. The base model,
//! each trained expert (`RUN:EXPERT`) and each adaptation (`RUN:ADAPTATION`, whose first pass
//! picks or mixes the expert per request) are models a request names; sequences of every model
//! share one continuously batched decode ([`engine`]); the HTTP side ([`http`]) is axum on a
//! small tokio runtime.

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::assets::TsqHome;

pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub api_key_file: Option<PathBuf>,
    pub capacity: engine::Capacity,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Decode small steps from Q8_0 copies of the weights ([`engine::start`]).
    pub decode_q8: bool,
    pub limits: api::Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Read(#[from] crate::fsutil::ReadError),
    #[error("the API key file `{0}` is empty")]
    EmptyKey(PathBuf),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

pub fn run(run_dir: &Path, opts: &ServeOptions) -> Result<(), ServeError> {
    // A client gone mid-answer must cost a failed write, not the process (main restores
    // SIGPIPE's default for `tsq ... | head`).
    // SAFETY: setting a signal's disposition; no handler runs Rust code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let api_key = match &opts.api_key_file {
        Some(file) => {
            let text = crate::fsutil::read_bounded(file, 4096)
                .map_err(crate::fsutil::ReadError::at(file))?;
            let key = text.trim().to_string();
            if key.is_empty() {
                return Err(ServeError::EmptyKey(file.clone()));
            }
            Some(key)
        }
        None => None,
    };
    eprintln!("tsq serve: loading {}", run_dir.display());
    let metrics = Arc::new(metrics::Metrics::default());
    let (catalog, jobs, engine) = engine::start(
        run_dir,
        TsqHome::from_env(),
        opts.capacity,
        opts.decode_q8,
        Arc::clone(&metrics),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let address = format!("{}:{}", opts.host, opts.port);
    let names: Vec<String> = catalog.models.iter().map(|(id, _)| id.clone()).collect();
    let state = Arc::new(http::ServerState {
        catalog,
        jobs,
        api_key,
        limits: opts.limits,
        metrics,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|source| ServeError::Bind {
                address: address.clone(),
                source,
            })?;
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() && state.api_key.is_none() {
            eprintln!(
                "tsq serve: warning: listening beyond this machine ({local}) without \
                 --api-key-file: anyone who can reach it can use it"
            );
        }
        // The line scripts and tests wait for: the server takes requests from here on.
        eprintln!(
            "tsq serve: listening on http://{local} (models: {})",
            names.join(", ")
        );
        accept(listener, http::app(state), opts.header_timeout).await;
        Ok::<_, ServeError>(())
    })?;
    // The state (and with it the engine's queue) is gone: the engine finishes and stops.
    let _ = engine.join();
    eprintln!("tsq serve: stopped");
    Ok(())
}

/// Serves each connection of `listener` with `app` until [`shutdown`], then waits for the
/// connections in flight to finish. A client that has not sent a request's headers within
/// `header_timeout` is disconnected (a slow-loris client holds a socket, not the server).
async fn accept(listener: tokio::net::TcpListener, app: axum::Router, header_timeout: Duration) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors, or a connection reset before it was taken: go on.
                Err(_) => continue,
            },
            () = &mut stop => break,
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(app.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Resolves at the first SIGTERM or Ctrl-C: the server stops taking connections and finishes
/// what is in flight. A second one stops the process at once.
async fn shutdown() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
    eprintln!("tsq serve: draining requests in flight (again to stop at once)");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}
