//! Reading compose files: the release's own and those it `include`s (files of the release
//! only), each parsed, merged (`<<`), checked key by key, and interpolated with its own `.env`.

use super::Parsed;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use yaml_serde::Value;

use super::interpolate::{Vars, interpolate_value, parse_env_lines};
use super::keys::{TOP_LEVEL, validate_keys};
use super::validate::inside_release;
use super::{Cx, active_profiles, entries, scalar_string, string_list, value_of};
use crate::config::ContainersConfig;
use crate::containers::error::ContainerError;

/// How deep `include` may nest.
const MAX_INCLUDE_DEPTH: usize = 8;

/// One compose file, ready to be parsed: where it is, its interpolated document, its variables
/// and the active profiles.
pub(super) struct Source<'e> {
    pub(super) cx: Cx,
    pub(super) doc: Value,
    pub(super) vars: Vars<'e>,
    pub(super) active: BTreeSet<String>,
}

/// The release's compose file first, then every file it includes, depth first.
pub(super) fn read_all<'e>(
    project: &str,
    release_dir: &Path,
    compose_file: &str,
    env: &'e BTreeMap<String, String>,
    settings: &ContainersConfig,
) -> Parsed<Vec<Source<'e>>> {
    let cx = Cx {
        path: release_dir.join(compose_file),
        release_dir: release_dir.to_path_buf(),
        base_dir: release_dir.to_path_buf(),
        project: project.to_string(),
    };
    let vars = Vars {
        shell: env,
        dotenv: read_env_file(&release_dir.join(".env"), false)?,
    };
    let active = active_profiles(settings, vars.get("COMPOSE_PROFILES"));
    let mut out = Vec::new();
    read_one(cx, vars, &active, &mut Vec::new(), &mut out)?;
    Ok(out)
}

/// `KEY=value` lines of a file; an absent optional file is empty.
pub(super) fn read_env_file(path: &Path, required: bool) -> Parsed<BTreeMap<String, String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(parse_env_lines(&t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(BTreeMap::new()),
        Err(source) => Err(ContainerError::ReadFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Read one file and, recursively, what it includes; `stack` holds the files being read, to
/// refuse include cycles.
fn read_one<'e>(
    cx: Cx,
    vars: Vars<'e>,
    active: &BTreeSet<String>,
    stack: &mut Vec<PathBuf>,
    out: &mut Vec<Source<'e>>,
) -> Parsed<()> {
    let text = std::fs::read_to_string(&cx.path).map_err(|source| ContainerError::ComposeRead {
        path: cx.path.clone(),
        source,
    })?;
    let syntax = |message: String| ContainerError::ComposeSyntax {
        path: cx.path.clone(),
        message,
    };
    let mut raw: Value = yaml_serde::from_str(&text).map_err(|e| syntax(e.to_string()))?;
    raw.apply_merge()
        .map_err(|e| syntax(format!("YAML merge key `<<`: {e}")))?;
    validate_keys(&cx, &raw, active)?;
    let doc = interpolate_value(&cx, &raw, &vars)?;
    let includes = match entries(&doc)
        .as_deref()
        .and_then(|top| value_of(top, "include"))
    {
        Some(v) => parse_includes(&cx, v)?,
        None => Vec::new(),
    };
    let shell = vars.shell;
    stack.push(cx.path.clone());
    out.push(Source {
        cx: cx.clone(),
        doc,
        vars,
        active: active.clone(),
    });
    for inc in includes {
        if stack.contains(&inc.path) || stack.len() >= MAX_INCLUDE_DEPTH {
            return Err(cx.invalid(
                TOP_LEVEL,
                "include",
                format!(
                    "`{}` is included in a cycle or nested more than {MAX_INCLUDE_DEPTH} deep",
                    inc.path.display()
                ),
            ));
        }
        let mut dotenv = BTreeMap::new();
        for file in &inc.env_files {
            dotenv.extend(read_env_file(file, inc.env_files_explicit)?);
        }
        let child = Cx {
            path: inc.path,
            release_dir: cx.release_dir.clone(),
            base_dir: inc.project_directory,
            project: cx.project.clone(),
        };
        read_one(child, Vars { shell, dotenv }, active, stack, out)?;
    }
    stack.pop();
    Ok(())
}

/// One `include` entry, resolved inside the release.
struct Include {
    path: PathBuf,
    project_directory: PathBuf,
    env_files: Vec<PathBuf>,
    /// `env_file` was given, so the files must exist.
    env_files_explicit: bool,
}

/// `include:`: a list of paths, or of mappings with `path`, `project_directory`, `env_file`.
fn parse_includes(cx: &Cx, v: &Value) -> Parsed<Vec<Include>> {
    let items = super::seq(cx, TOP_LEVEL, "include", v)?;
    let mut out = Vec::new();
    for item in items {
        let fields = entries(item).unwrap_or_default();
        let field = |k: &str| value_of(&fields, k);
        let path = match scalar_string(item) {
            Some(p) => p,
            None => {
                let paths = field("path")
                    .map(|p| string_list(cx, TOP_LEVEL, "include.path", p))
                    .transpose()?
                    .unwrap_or_default();
                match paths.as_slice() {
                    [one] => one.clone(),
                    [] => return Err(cx.invalid(TOP_LEVEL, "include.path", "is required")),
                    _ => {
                        return Err(cx.unsupported(
                            TOP_LEVEL,
                            "include.path",
                            "deployd includes one file per entry, without override files",
                        ));
                    }
                }
            }
        };
        let path = inside_release(cx, TOP_LEVEL, "include", &path)?;
        if !path.is_file() {
            return Err(cx.invalid(
                TOP_LEVEL,
                "include",
                format!("`{}` is not a file of the release", path.display()),
            ));
        }
        let project_directory = match field("project_directory").and_then(scalar_string) {
            Some(d) => inside_release(cx, TOP_LEVEL, "include.project_directory", &d)?,
            None => path.parent().unwrap_or(&cx.base_dir).to_path_buf(),
        };
        let (env_files, env_files_explicit) = match field("env_file") {
            Some(e) => (
                string_list(cx, TOP_LEVEL, "include.env_file", e)?
                    .iter()
                    .map(|f| inside_release(cx, TOP_LEVEL, "include.env_file", f))
                    .collect::<Result<_, _>>()?,
                true,
            ),
            None => (vec![project_directory.join(".env")], false),
        };
        out.push(Include {
            path,
            project_directory,
            env_files,
            env_files_explicit,
        });
    }
    Ok(out)
}
