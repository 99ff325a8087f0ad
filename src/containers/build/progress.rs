//! BuildKit's progress as the Engine API streams it: `{"id":"moby.buildkit.trace","aux":"<base64>"}`
//! messages, each a protobuf `moby.buildkit.v1.StatusResponse` (decoded with the generated types
//! of `bollard-buildkit-proto` and `prost`). Every update names vertices by digest; a vertex is a
//! step of the build graph, and the Dockerfile's own steps are the ones named `[<stage> n/m]
//! INSTRUCTION` (`[internal] ...` vertices load the context and metadata). A step is a cache hit
//! when BuildKit reports it `cached`: from its own cache, or from the inline cache metadata of an
//! image listed in `cache_from`.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use bollard_buildkit_proto::moby::buildkit::v1::StatusResponse;
use prost::Message as _;

/// Lines of a step's output kept for the error message when that step fails.
const TAIL_LINES: usize = 5;

/// What one BuildKit build did, vertex by vertex.
#[derive(Debug, Default)]
pub(super) struct Progress {
    vertices: Vec<Vertex>,
    by_digest: HashMap<String, usize>,
}

#[derive(Debug, Default)]
struct Vertex {
    name: String,
    cached: bool,
    completed: bool,
    error: String,
    /// The end of its output, for the error message.
    tail: Vec<String>,
    partial: String,
}

/// A Dockerfile step as BuildKit names it: `[deps 2/4] RUN make`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Step<'a> {
    /// The stage (`deps`, `stage-2`), or `None` in a single-stage build.
    pub(super) stage: Option<&'a str>,
    /// `RUN make`.
    pub(super) instruction: &'a str,
}

/// Parse a vertex name as a Dockerfile step; `None` for BuildKit's own vertices.
pub(super) fn parse_step(name: &str) -> Option<Step<'_>> {
    let rest = name.strip_prefix('[')?;
    let (inside, instruction) = rest.split_once("] ")?;
    let (stage, count) = match inside.rsplit_once(' ') {
        Some((stage, count)) => (Some(stage), count),
        None => (None, inside),
    };
    let (n, m) = count.split_once('/')?;
    if n.parse::<u32>().is_err() || m.parse::<u32>().is_err() {
        return None;
    }
    Some(Step { stage, instruction })
}

impl Progress {
    /// Dockerfile steps done and known so far, for a progress bar.
    pub(super) fn at(&self) -> Option<(usize, usize)> {
        let steps = self
            .vertices
            .iter()
            .filter(|v| parse_step(&v.name).is_some());
        let (done, total) = steps.fold((0, 0), |(d, t), v| (d + usize::from(v.completed), t + 1));
        (total > 0).then_some((done, total))
    }
}

/// Steps and cache hits of a build.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Count {
    /// The Dockerfile's steps that ran or hit (`FROM` included).
    pub(super) steps: usize,
    /// Of those, `FROM` steps (never cache hits: they name an image).
    pub(super) from_steps: usize,
    /// Steps other than `FROM` that were cache hits.
    pub(super) hits: usize,
}

impl Progress {
    /// Apply one `moby.buildkit.trace` message (base64 protobuf). A message that does not decode
    /// is logged and skipped: progress is for reporting, the build's result comes separately.
    pub(super) fn feed(&mut self, service: &str, aux: &str) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(aux.trim())
            .map_err(|e| e.to_string())
            .and_then(|raw| StatusResponse::decode(raw.as_slice()).map_err(|e| e.to_string()));
        match decoded {
            Ok(status) => self.apply(service, status),
            Err(error) => tracing::debug!(service, %error, "undecodable BuildKit progress"),
        }
    }

    fn apply(&mut self, service: &str, status: StatusResponse) {
        for v in status.vertexes {
            let i = self.vertex(&v.digest);
            let vertex = &mut self.vertices[i];
            if !v.name.is_empty() {
                vertex.name = v.name;
            }
            vertex.cached |= v.cached;
            if !v.error.is_empty() {
                vertex.error = v.error;
            }
            if v.completed.is_some() && !vertex.completed {
                vertex.completed = true;
                tracing::debug!(
                    service,
                    step = %vertex.name,
                    cached = vertex.cached,
                    error = %vertex.error,
                    "build step done"
                );
            }
        }
        for log in status.logs {
            let i = self.vertex(&log.vertex);
            let vertex = &mut self.vertices[i];
            vertex.partial.push_str(&String::from_utf8_lossy(&log.msg));
            while let Some(end) = vertex.partial.find('\n') {
                let line: String = vertex.partial.drain(..=end).collect();
                let line = line.trim_end();
                tracing::debug!(service, step = %vertex.name, "{line}");
                if vertex.tail.len() == TAIL_LINES {
                    vertex.tail.remove(0);
                }
                vertex.tail.push(line.to_string());
            }
        }
    }

    fn vertex(&mut self, digest: &str) -> usize {
        if let Some(i) = self.by_digest.get(digest) {
            return *i;
        }
        self.vertices.push(Vertex::default());
        self.by_digest
            .insert(digest.to_string(), self.vertices.len() - 1);
        self.vertices.len() - 1
    }

    /// The Dockerfile's steps with whether each was a cache hit. A step BuildKit split into more
    /// than one vertex of the same name is one step, a hit only if all of them were.
    fn steps(&self) -> Vec<(Step<'_>, bool)> {
        let mut steps: Vec<(Step<'_>, bool)> = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for v in &self.vertices {
            let Some(step) = parse_step(&v.name) else {
                continue;
            };
            match seen.get(v.name.as_str()) {
                Some(&i) => steps[i].1 &= v.cached,
                None => {
                    seen.insert(&v.name, steps.len());
                    steps.push((step, v.cached));
                }
            }
        }
        steps
    }

    /// Steps and cache hits of the steps not in `counted` (an earlier build of the same
    /// service counted those), which are added to it.
    pub(super) fn count_new(&self, counted: &mut HashSet<String>) -> Count {
        let mut count = Count::default();
        for (step, cached) in self.steps() {
            if !counted.insert(format!(
                "{}\0{}",
                step.stage.unwrap_or(""),
                step.instruction
            )) {
                continue;
            }
            count.steps += 1;
            if is_from(step.instruction) {
                count.from_steps += 1;
            } else if cached {
                count.hits += 1;
            }
        }
        count
    }

    /// The failed step and the end of its output, for the error message.
    pub(super) fn failure(&self) -> Option<String> {
        let v = self.vertices.iter().find(|v| !v.error.is_empty())?;
        let mut text = format!("step `{}`", v.name);
        if !v.tail.is_empty() {
            text.push_str(&format!(", its last output: {}", v.tail.join(" | ")));
        }
        Some(text)
    }
}

fn is_from(instruction: &str) -> bool {
    instruction
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("FROM "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard_buildkit_proto::google::protobuf::Timestamp;
    use bollard_buildkit_proto::moby::buildkit::v1::{Vertex as V, VertexLog};

    fn trace(vertexes: Vec<V>, logs: Vec<VertexLog>) -> String {
        let status = StatusResponse {
            vertexes,
            logs,
            ..Default::default()
        };
        base64::engine::general_purpose::STANDARD.encode(status.encode_to_vec())
    }

    fn v(digest: &str, name: &str, cached: bool, done: bool) -> V {
        V {
            digest: digest.into(),
            name: name.into(),
            cached,
            completed: done.then(Timestamp::default),
            ..Default::default()
        }
    }

    #[test]
    fn step_names() {
        assert_eq!(
            parse_step("[deps 2/4] RUN make"),
            Some(Step {
                stage: Some("deps"),
                instruction: "RUN make"
            })
        );
        assert_eq!(
            parse_step("[3/5] COPY a b"),
            Some(Step {
                stage: None,
                instruction: "COPY a b"
            })
        );
        assert_eq!(parse_step("[internal] load build context"), None);
        assert_eq!(parse_step("copy /context /"), None);
        assert_eq!(parse_step("[a b/c] X"), None);
    }

    /// A progress fed with one trace message of these vertices.
    fn fed(vertices: Vec<V>) -> Progress {
        let mut p = Progress::default();
        p.feed("s", &trace(vertices, vec![]));
        p
    }

    #[test]
    fn counts_steps_and_hits_across_updates_and_builds() {
        let mut p = fed(vec![
            v("d0", "[internal] load build context", false, true),
            v("d1", "[deps 1/3] FROM docker.io/library/base:1", true, true),
            v("d2", "[deps 2/3] RUN make deps", false, false),
            v("d3", "[stage-1 2/2] COPY --from=deps /d /d", false, false),
        ]);
        // Later updates carry the digest and change fields; a name may be left out.
        p.feed(
            "s",
            &trace(
                vec![v("d2", "", true, true), v("d3", "", false, true)],
                vec![],
            ),
        );
        p.feed("s", "not base64!");
        let mut counted = HashSet::new();
        let count = |steps, from_steps, hits| Count {
            steps,
            from_steps,
            hits,
        };
        assert_eq!(p.count_new(&mut counted), count(3, 1, 1));
        // A later build of the same service shows the stage again: not counted twice.
        let later = fed(vec![
            v("e1", "[deps 2/3] RUN make deps", true, true),
            v("e2", "[stage-1 3/3] COPY src /src", true, true),
        ]);
        assert_eq!(later.count_new(&mut counted), count(1, 0, 1));
    }

    #[test]
    fn a_failed_step_is_named_with_its_last_output() {
        let mut p = Progress::default();
        let mut failed = v("d1", "[2/2] RUN ./build", false, true);
        failed.error = "exit code: 3".into();
        let log = |msg: &str| VertexLog {
            vertex: "d1".into(),
            msg: msg.as_bytes().to_vec(),
            ..Default::default()
        };
        p.feed(
            "s",
            &trace(vec![failed], vec![log("compiling\nerror: no"), log("pe\n")]),
        );
        assert_eq!(
            p.failure().as_deref(),
            Some("step `[2/2] RUN ./build`, its last output: compiling | error: nope")
        );
    }
}
