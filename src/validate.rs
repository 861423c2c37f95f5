//! Turns a parsed request into a checked [`Request`]: paths must be
//! absolute, exist, and lie inside the daemon's workspace root (after
//! symlinks are resolved). Reasons say what was wrong and what to do.

use crate::machine::{BuildKind, BuildRequest, Request};
use crate::protocol::{Action, Invalid, RawRequest, MAX_MESSAGE_BYTES};
use std::path::{Path, PathBuf};

/// Checks `raw` against the workspace root `root` (already canonical), at
/// `now` (ms since the epoch).
pub fn check(raw: RawRequest, root: &Path, now: u64) -> Result<Request, Invalid> {
    let action = raw.action;
    let fail = |reason: String| Invalid::new(Some(action.as_str().to_string()), reason);
    if let Some(expired) = raw.expires_at.filter(|&t| t < now) {
        // Its client has given up: a build nobody waits for must not start.
        return Err(fail(format!(
            "the request expired {} s before latd saw it (its client stopped waiting); send it again",
            (now - expired).div_ceil(1000)
        )));
    }
    let needs_workdir = !matches!(action, Action::Status | Action::Stop);
    let workdir = if needs_workdir {
        workdir(raw.workdir.as_deref(), root).map_err(fail)?
    } else {
        root.to_path_buf()
    };
    Ok(match action {
        Action::Status => Request::Status,
        Action::Stop => Request::Stop,
        Action::Logs => {
            let path = workdir.join("log").join(crate::sdklog::LOG_NAME);
            let missing = match crate::fsutil::open_log(&path) {
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
                    "No log file found ({} does not exist)",
                    path.display()
                )),
                Err(e) => Some(format!(
                    "No log file found ({} cannot be used: {e})",
                    path.display()
                )),
            };
            Request::Logs { path, missing }
        }
        Action::Clean => Request::Clean { workdir },
        Action::Getyaml => Request::GetYaml { workdir },
        Action::Build => {
            let yaml_file = yaml_file(raw.yaml_file.as_deref(), root).map_err(fail)?;
            let kind = build_kind(&yaml_file).map_err(fail)?;
            Request::Build(BuildRequest {
                workdir,
                yaml_file,
                kind,
            })
        }
    })
}

fn workdir(given: Option<&str>, root: &Path) -> Result<PathBuf, String> {
    let Some(given) = given else {
        return Ok(root.to_path_buf());
    };
    let path = Path::new(given);
    if !path.is_absolute() {
        return Err(format!(
            "workdir '{given}' is not an absolute path; send the full path of a directory under {}",
            root.display()
        ));
    }
    let real = path.canonicalize().map_err(|e| {
        format!(
            "workdir {given} cannot be used: {e}; send an existing directory under {}",
            root.display()
        )
    })?;
    if !real.is_dir() {
        return Err(format!(
            "workdir {given} is not a directory; send an existing directory under {}",
            root.display()
        ));
    }
    inside_root(&real, root, "workdir", given)?;
    Ok(real)
}

fn yaml_file(given: Option<&str>, root: &Path) -> Result<PathBuf, String> {
    let Some(given) = given.filter(|g| !g.is_empty()) else {
        return Err(
            "build needs 'yaml_file': the absolute path of the image YAML (latc build --file PATH)"
                .into(),
        );
    };
    let path = Path::new(given);
    if !path.is_absolute() {
        return Err(format!(
            "yaml_file '{given}' is not an absolute path; send the absolute path of the image YAML under {} (latc build --file PATH does)",
            root.display()
        ));
    }
    let real = path
        .canonicalize()
        .map_err(|e| {
            format!(
                "yaml_file {given} cannot be used: {e}; give an existing image YAML (latc build --file PATH)"
            )
        })?;
    inside_root(&real, root, "yaml_file", given)?;
    if !real.is_file() {
        return Err(format!(
            "yaml_file {given} is not a regular file; give an image YAML file (latc build --file PATH)"
        ));
    }
    Ok(real)
}

fn inside_root(real: &Path, root: &Path, what: &str, given: &str) -> Result<(), String> {
    if real.starts_with(root) {
        Ok(())
    } else {
        let shown = if real == Path::new(given) {
            String::new()
        } else {
            format!(" (resolves to {})", real.display())
        };
        Err(format!(
            "{what} {given}{shown} is outside the workspace {}; latd only works under its workspace (set WORKSPACE_DIR for both latd and latc)",
            root.display()
        ))
    }
}

/// Reads the image YAML: it must be a readable YAML mapping; an
/// `image_type` that mentions initramfs selects `geninitramfs`.
fn build_kind(yaml: &Path) -> Result<BuildKind, String> {
    let (bytes, too_long, _) =
        crate::fsutil::read_capped(yaml, MAX_MESSAGE_BYTES).map_err(|e| {
            format!(
                "yaml_file {} cannot be read: {e}; make it readable by latd",
                yaml.display()
            )
        })?;
    if too_long {
        return Err(format!(
            "yaml_file {} is larger than 1 MiB; an image YAML is a small text file",
            yaml.display()
        ));
    }
    if crate::protocol::nesting_depth(&bytes) > crate::protocol::MAX_NESTING {
        return Err(format!(
            "yaml_file {} nests deeper than {} levels",
            yaml.display(),
            crate::protocol::MAX_NESTING
        ));
    }
    if let Err(e) = crate::yaml_limits::check(&bytes, &crate::yaml_limits::IMAGE) {
        return Err(format!(
            "yaml_file {} is refused: {e}; an image YAML is a plain mapping ('latc getyaml' writes an example)",
            yaml.display()
        ));
    }
    let doc: serde_yaml::Value = serde_yaml::from_slice(&bytes).map_err(|e| {
        format!(
            "yaml_file {} is not valid YAML: {e}; fix it ('latc getyaml' writes an example)",
            yaml.display()
        )
    })?;
    let Some(map) = doc.as_mapping() else {
        return Err(format!(
            "yaml_file {} is not a YAML mapping; an image YAML maps keys to values ('latc getyaml' writes an example)",
            yaml.display()
        ));
    };
    let initramfs = match map.get("image_type") {
        Some(serde_yaml::Value::String(s)) => s.contains("initramfs"),
        Some(serde_yaml::Value::Sequence(items)) => items
            .iter()
            .any(|i| i.as_str().is_some_and(|s| s.contains("initramfs"))),
        _ => false,
    };
    Ok(if initramfs {
        BuildKind::Geninitramfs
    } else {
        BuildKind::Genimage
    })
}
