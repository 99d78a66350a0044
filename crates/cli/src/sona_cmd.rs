//! `ruvllm sona status | consolidate | rollback`: the deep loop and the version history of a
//! `--sona-dir`, run while no server or chat session uses the directory.

use crate::error::Error;
use crate::{load, ModelArgs};
use clap::{Args, Subcommand};
use ruvllm_sona::learner::{list_versions, rollback, scope_key, LearnConfig, Learner, ANCHOR_TEXT};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `ruvllm sona`.
#[derive(Args)]
pub struct SonaArgs {
    #[command(subcommand)]
    cmd: SonaCmd,
}

#[derive(Subcommand)]
enum SonaCmd {
    /// List every scope's kept versions (kind, lessons) and which one is current.
    Status {
        /// The learned-state directory (`serve --sona-dir`, `chat --sona-dir`).
        #[arg(long = "sona-dir", value_name = "DIR")]
        dir: PathBuf,
    },
    /// The deep loop: merge each scope's micro-adapter into its base adapter (truncated SVD,
    /// pruning), reset the micro-adapter, and write a consolidated snapshot.
    Consolidate {
        #[command(flatten)]
        model: ModelArgs,
        /// The learned-state directory.
        #[arg(long = "sona-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Only this scope (its name: the API key, or `chat`).
        #[arg(long)]
        scope: Option<String>,
    },
    /// Make an earlier version current again (the previous one, or `--to N`).
    Rollback {
        /// The learned-state directory.
        #[arg(long = "sona-dir", value_name = "DIR")]
        dir: PathBuf,
        /// Only this scope (its name: the API key, or `chat`).
        #[arg(long)]
        scope: Option<String>,
        /// The version to return to.
        #[arg(long)]
        to: Option<u64>,
    },
}

fn dir_error(dir: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::usage(format!("--sona-dir {}: {e}", dir.display()))
}

/// Runs `ruvllm sona …`.
pub fn run(a: SonaArgs) -> Result<(), Error> {
    match a.cmd {
        SonaCmd::Status { dir } => {
            let scopes = list_versions(&dir).map_err(|e| dir_error(&dir, e))?;
            if scopes.is_empty() {
                println!("no scopes under {}", dir.display());
            }
            for h in scopes {
                println!(
                    "scope {} (current: {})",
                    h.key,
                    h.current.map_or("none".to_owned(), |c| c.to_string())
                );
                for v in h.versions {
                    println!(
                        "  v{} {} ({} lessons){}",
                        v.version,
                        v.kind,
                        v.lessons,
                        if Some(v.version) == h.current {
                            "  <- current"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(())
        }
        SonaCmd::Consolidate { model, dir, scope } => {
            let l = load(&model)?;
            let m = Arc::new(l.model);
            let (mut learner, report) = Learner::open(&dir, m).map_err(|e| dir_error(&dir, e))?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            learner.configure(
                LearnConfig::default(),
                Some(l.tok.encode(ANCHOR_TEXT, true, false)),
            );
            let keys = match &scope {
                Some(s) => vec![scope_key(s)],
                None => learner.scope_keys(),
            };
            if keys.is_empty() {
                println!("no scopes under {}", dir.display());
            }
            for key in keys {
                let t = std::time::Instant::now();
                let c = learner
                    .consolidate_key(&key)
                    .map_err(|e| Error::usage(format!("scope {key}: {e}")))?;
                println!(
                    "scope {key}: v{} consolidated in {:.0} ms: rank {} (pruned {}), lesson loss {:.3} -> {:.3}{}",
                    c.version,
                    t.elapsed().as_secs_f64() * 1e3,
                    c.rank,
                    c.pruned,
                    c.loss_before,
                    c.loss_after,
                    if c.persisted { "" } else { " (NOT saved)" }
                );
                if !c.persisted {
                    return Err(Error::usage(format!(
                        "scope {key}: the snapshot could not be written"
                    )));
                }
            }
            Ok(())
        }
        SonaCmd::Rollback { dir, scope, to } => {
            let changed = rollback(&dir, scope.as_deref(), to).map_err(|e| dir_error(&dir, e))?;
            if changed.is_empty() {
                println!("nothing to roll back");
            }
            for (key, from, to) in changed {
                println!("scope {key}: v{from} -> v{to}");
            }
            Ok(())
        }
    }
}
