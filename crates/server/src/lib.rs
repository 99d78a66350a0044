//! `ruvllm serve`: an OpenAI-compatible HTTP API over one [`Engine`].
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with SSE streaming),
//! `POST /v1/embeddings`, `GET /v1/models[/{id}]`, `POST /tokenize`, `POST /detokenize`,
//! `GET /health`, `GET /ready`, `GET /metrics` (Prometheus text), `GET /openapi.json`.
//! Every error is OpenAI-shaped (`{"error":{"message","type","param","code"}}`) and every status
//! comes from one function, [`ApiError::status`]. Bodies are parsed by hand from JSON values so
//! that a wrong type names its parameter.
#![deny(missing_docs)]

mod api;
mod learn;
mod openapi;
mod prom;

pub use api::ApiError;
pub use learn::{EngineCapture, Learning, KEEP_MIB};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ruvllm_engine::Engine;
use ruvllm_tokenizer::{ChatTemplate, Tokenizer};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the server serves and how.
pub struct ServerConfig {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Accepted API keys; empty means no authentication.
    pub api_keys: HashSet<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Names the model answers to (`model` field, `/v1/models`), the first being canonical.
    pub model_names: Vec<String>,
    /// How long in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    pub shutdown_grace: Duration,
    /// Learn from `POST /v1/feedback` (off: outputs stay the base model's).
    pub learning: bool,
    /// Where learned state is persisted and restored from (`--sona-dir`).
    pub sona_dir: Option<std::path::PathBuf>,
    /// Seconds between timer-driven background-loop runs for scopes with new feedback (0:
    /// only every `background_every` events).
    pub sona_background_secs: u64,
    /// Seconds between deep-loop runs (consolidation of every scope; 0: never on a timer).
    pub sona_consolidate_secs: u64,
    /// Threads of the learner's pool (`--sona-threads`).
    pub sona_threads: usize,
    /// Threads the instant loop uses while serving is idle (`--sona-idle-threads`).
    pub sona_idle_threads: usize,
    /// Whether every completion becomes a ReasoningBank trajectory (`--sona-trajectories all`,
    /// one embedding pass each) or only those that get feedback (`feedback`).
    pub sona_all_trajectories: bool,
    /// Whether a caller's learned adapter runs only for questions near one it taught
    /// (`--sona-apply near`) or for all its requests (`always`).
    pub sona_apply_near: bool,
    /// Memory for activations kept while answers are generated (`--sona-keep-mib`): a rating
    /// trains on them without a forward pass.
    pub sona_keep_bytes: usize,
    /// The most answer tokens a rating teaches (`--sona-rated-rows`, 0: all; see
    /// [`ruvllm_sona::learner::LearnConfig::rated_rows`]).
    pub sona_rated_rows: usize,
    /// The most tokens a correction teaches (`--sona-corrected-rows`, 0: all; see
    /// [`ruvllm_sona::learner::LearnConfig::corrected_rows`]).
    pub sona_corrected_rows: usize,
}

/// Shared by every handler.
pub struct AppState {
    pub(crate) engine: Arc<Engine>,
    /// Learning from feedback; `None` with `--no-learning`.
    pub(crate) learning: Option<Arc<Learning>>,
    /// LoRA adapters by name, replaceable at run time (hot swap).
    pub(crate) adapters:
        std::sync::RwLock<std::collections::HashMap<String, Arc<ruvllm_model::LoraAdapter>>>,
    next_adapter_id: AtomicU64,
    pub(crate) tok: Arc<Tokenizer>,
    pub(crate) template: ChatTemplate,
    pub(crate) names: Vec<String>,
    pub(crate) keys: HashSet<String>,
    pub(crate) created: u64,
    pub(crate) n_embd: usize,
    pub(crate) ready: AtomicBool,
    next_id: AtomicU64,
}

impl AppState {
    /// State for serving `engine` with the model's tokenizer and chat template; with
    /// `cfg.sona_dir`, learned adapters are restored from it (an unusable directory is an error).
    pub fn new(
        engine: Arc<Engine>,
        tok: Arc<Tokenizer>,
        template: ChatTemplate,
        n_embd: usize,
        cfg: &ServerConfig,
    ) -> std::io::Result<AppState> {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let anchor = tok.encode(ruvllm_sona::learner::ANCHOR_TEXT, true, false);
        let learn_cfg = ruvllm_sona::learner::LearnConfig {
            threads: cfg.sona_threads,
            idle_threads: cfg.sona_idle_threads,
            rated_rows: cfg.sona_rated_rows,
            corrected_rows: cfg.sona_corrected_rows,
            ..Default::default()
        };
        let learning = match (&cfg.sona_dir, cfg.learning) {
            (_, false) => None,
            (None, true) => Some(Arc::new(
                Learning::new(engine.clone(), tok.clone(), anchor, learn_cfg)
                    .with_all_trajectories(cfg.sona_all_trajectories)
                    .with_apply_near(cfg.sona_apply_near)
                    .with_kept_budget(cfg.sona_keep_bytes),
            )),
            (Some(dir), true) => {
                let (l, n) = Learning::open(dir, engine.clone(), tok.clone(), anchor, learn_cfg)?;
                let l = l
                    .with_all_trajectories(cfg.sona_all_trajectories)
                    .with_apply_near(cfg.sona_apply_near)
                    .with_kept_budget(cfg.sona_keep_bytes);
                tracing::info!(dir = %dir.display(), scopes = n, "learned state restored");
                eprintln!(
                    "ruvllm: learned state in {} ({n} scopes restored)",
                    dir.display()
                );
                Some(Arc::new(l))
            }
        };
        Ok(AppState {
            engine,
            learning,
            adapters: Default::default(),
            next_adapter_id: AtomicU64::new(1),
            tok,
            template,
            names: cfg.model_names.clone(),
            keys: cfg.api_keys.clone(),
            created,
            n_embd,
            ready: AtomicBool::new(true),
            next_id: AtomicU64::new(created.wrapping_mul(0x9E37_79B9) & 0xFFFF_FFFF_0000),
        })
    }

    /// Loads (or replaces, with a new version) the adapter `name` from a PEFT directory or file.
    pub fn load_adapter(
        &self,
        name: &str,
        path: &std::path::Path,
        scale: f32,
    ) -> Result<Arc<ruvllm_model::LoraAdapter>, ruvllm_model::Error> {
        let mut guard = self.adapters.write().unwrap_or_else(|p| p.into_inner());
        let (id, version) = match guard.get(name) {
            Some(old) => (old.id, old.version + 1),
            None => (self.next_adapter_id.fetch_add(1, Ordering::Relaxed), 0),
        };
        let mut a =
            ruvllm_model::LoraAdapter::load_peft(path, self.engine.model(), name, id, scale)?;
        a.version = version;
        let a = Arc::new(a);
        guard.insert(name.to_owned(), a.clone());
        Ok(a)
    }

    pub(crate) fn adapter(&self, name: &str) -> Option<Arc<ruvllm_model::LoraAdapter>> {
        self.adapters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// A fresh response id with `prefix` (`chatcmpl`, `cmpl`, ...).
    pub(crate) fn new_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:016x}",
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Resolves a request's `model` field: the canonical name, or 404 `model_not_found`.
    pub(crate) fn model(&self, requested: Option<&str>) -> Result<String, ApiError> {
        let Some(m) = requested else {
            return Err(ApiError::invalid(
                "model",
                "you must provide a model parameter",
            ));
        };
        if self.names.iter().any(|n| n == m) {
            Ok(m.to_owned())
        } else {
            Err(ApiError::model_not_found(m, &self.names))
        }
    }
}

/// The caller's identity (its API key, or `anonymous`), attached to each request for per-user
/// state such as learning scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

async fn auth(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let open = req.uri().path() == "/health";
    if st.keys.is_empty() || open {
        req.extensions_mut().insert(Caller("anonymous".into()));
        return next.run(req).await;
    }
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned);
    match key {
        Some(k) if st.keys.contains(&k) => {
            req.extensions_mut().insert(Caller(k));
            next.run(req).await
        }
        Some(_) => ApiError::unauthorized("Incorrect API key provided.").into_response(),
        None => {
            ApiError::unauthorized("Missing API key: send an `Authorization: Bearer <key>` header.")
                .into_response()
        }
    }
}

/// Logs each request with an id, status and duration.
async fn log_requests(req: Request, next: Next) -> Response {
    let t = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    tracing::info!(%method, path, status = resp.status().as_u16(), ms = t.elapsed().as_secs_f64() * 1e3, "http request");
    resp
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(st): State<Arc<AppState>>) -> Response {
    if st.ready.load(Ordering::Relaxed) {
        axum::Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        ApiError::unavailable("the server is shutting down").into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let mut body = prom::render(&st.engine.metrics());
    if let Some(l) = &st.learning {
        let (all, rated) = l.trajectory_counts();
        body.push_str(&format!(
            "# HELP ruvllm_sona_trajectories ReasoningBank trajectories held, over all callers.\n# TYPE ruvllm_sona_trajectories gauge\nruvllm_sona_trajectories{{rated=\"false\"}} {}\nruvllm_sona_trajectories{{rated=\"true\"}} {rated}\n",
            all - rated
        ));
        let (kept, computed) = l.capture().lesson_sources();
        body.push_str(&format!(
            "# HELP ruvllm_sona_kept_bytes Activations kept from generations for feedback on them.\n# TYPE ruvllm_sona_kept_bytes gauge\nruvllm_sona_kept_bytes {}\n# HELP ruvllm_sona_lessons_total Feedback lessons by where their activations came from: kept while generating, or computed by the engine.\n# TYPE ruvllm_sona_lessons_total counter\nruvllm_sona_lessons_total{{source=\"kept\"}} {kept}\nruvllm_sona_lessons_total{{source=\"computed\"}} {computed}\n",
            l.capture().kept_bytes()
        ));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn openapi_doc() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::DOCUMENT,
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        None,
        Some("not_found"),
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// The router with every route, authentication, the body limit and request logging.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/embeddings", post(api::embeddings))
        .route("/v1/models", get(api::list_models))
        .route("/v1/models/{id}", get(api::get_model))
        .route(
            "/v1/adapters",
            get(api::list_adapters).post(api::load_adapter),
        )
        .route(
            "/v1/adapters/{name}",
            axum::routing::delete(api::delete_adapter),
        )
        .route("/v1/feedback", post(learn::feedback))
        .route("/tokenize", post(api::tokenize))
        .route("/detokenize", post(api::detokenize))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_doc))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(log_requests))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Binds and serves until SIGINT/SIGTERM: then stops accepting, lets in-flight requests finish
/// for `shutdown_grace`, cancels the rest, stops the engine and returns.
pub async fn serve(state: Arc<AppState>, cfg: &ServerConfig) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, model = cfg.model_names.first().map(String::as_str).unwrap_or(""), "listening");
    // Printed for scripts and tests that start the server on port 0.
    println!("ruvllm: listening on http://{local}");
    let app = router(state.clone(), cfg.max_body_bytes);
    if let Some(l) = state.learning.clone() {
        learn::spawn_timers(l, cfg.sona_background_secs, cfg.sona_consolidate_secs);
    }
    let engine = state.engine.clone();
    let grace = cfg.shutdown_grace;
    let st = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new connections; waiting for in-flight requests");
            st.ready.store(false, Ordering::Relaxed);
            let engine = engine.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tracing::info!("grace period over: cancelling in-flight requests");
                tokio::task::spawn_blocking(move || engine.shutdown());
            });
        })
        .await?;
    let engine = state.engine.clone();
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Sets up logging: human-readable, or one JSON object per line with `json`. `RUST_LOG`
/// overrides the default level (`info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
