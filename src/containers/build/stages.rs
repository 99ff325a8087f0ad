//! Which stages of a multi-stage Dockerfile get stage images (see the build module).

use parse_dockerfile::{Instruction, Stage};

/// The named stages a build of `target` (else of the last stage) runs before it, in file
/// order, lower-cased as the engine matches them; with `needed_only`, only those the target
/// depends on (`FROM <stage>`, `COPY --from=<stage>`, `RUN --mount=...,from=<stage>`), as
/// BuildKit builds them. Empty for a single-stage Dockerfile, for an unknown target and for a
/// Dockerfile that does not parse: the build itself then reports what is wrong, and the only
/// cost of an empty list is cache that is not reused.
pub(super) fn intermediate_stages(
    dockerfile: &str,
    target: Option<&str>,
    needed_only: bool,
) -> Vec<String> {
    let Ok(parsed) = parse_dockerfile::parse(dockerfile) else {
        return Vec::new();
    };
    let stages: Vec<Stage<'_, '_>> = parsed.stages().collect();
    let names: Vec<Option<String>> = stages
        .iter()
        .map(|s| {
            s.from
                .as_
                .as_ref()
                .map(|(_, n)| n.value.to_ascii_lowercase())
        })
        .collect();
    let end = match target {
        Some(t) => {
            let t = t.to_ascii_lowercase();
            match names.iter().position(|n| n.as_deref() == Some(t.as_str())) {
                Some(i) => i,
                None => return Vec::new(),
            }
        }
        None => names.len().saturating_sub(1),
    };
    let needed = if needed_only {
        needed_stages(&stages, &names, end)
    } else {
        vec![true; names.len()]
    };
    names[..end]
        .iter()
        .zip(&needed)
        .filter_map(|(n, needed)| n.as_ref().filter(|_| *needed))
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .cloned()
        .collect()
}

/// Which stages the stage `end` depends on, itself included, by index.
fn needed_stages(stages: &[Stage<'_, '_>], names: &[Option<String>], end: usize) -> Vec<bool> {
    let mut needed = vec![false; stages.len()];
    let mut todo = vec![end];
    while let Some(i) = todo.pop() {
        if needed[i] {
            continue;
        }
        needed[i] = true;
        let stage = &stages[i];
        let mut refs = vec![stage.from.image.value.to_string()];
        for instruction in stage.instructions {
            let flags = match instruction {
                Instruction::Copy(c) => &c.options[..],
                Instruction::Run(r) => &r.options[..],
                _ => continue,
            };
            for flag in flags {
                let Some(value) = &flag.value else { continue };
                match &*flag.name.value {
                    "from" => refs.push(value.value.to_string()),
                    "mount" => refs.extend(
                        value
                            .value
                            .split(',')
                            .filter_map(|kv| kv.strip_prefix("from="))
                            .map(str::to_string),
                    ),
                    _ => {}
                }
            }
        }
        for r in refs {
            let r = r.to_ascii_lowercase();
            let by_name = names[..i].iter().position(|n| n.as_deref() == Some(&r));
            let by_index = r.parse::<usize>().ok().filter(|j| *j < i);
            todo.extend(by_name.or(by_index));
        }
    }
    needed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediate_stages_are_the_named_ones_before_the_target() {
        let dockerfile = "\
# syntax=docker/dockerfile:1
ARG BASE=busybox
FROM --platform=linux/amd64 ${BASE} AS Deps
RUN make deps
FROM deps as build
RUN make \\
    build
FROM ${BASE}
COPY --from=0 /d /d
FROM build AS test
RUN make test
FROM ${BASE} AS runtime
COPY --from=build /app /app
";
        assert_eq!(
            intermediate_stages(dockerfile, None, false),
            ["deps", "build", "test"]
        );
        assert_eq!(
            intermediate_stages(dockerfile, Some("BUILD"), false),
            ["deps"]
        );
        assert_eq!(
            intermediate_stages(dockerfile, Some("deps"), false),
            Vec::<String>::new()
        );
        assert_eq!(
            intermediate_stages(dockerfile, Some("nope"), false),
            Vec::<String>::new()
        );
        assert_eq!(
            intermediate_stages("FROM busybox\nRUN true\n", None, false),
            Vec::<String>::new()
        );
        assert_eq!(
            intermediate_stages("RUN before from\n", None, false),
            Vec::<String>::new()
        );
    }

    #[test]
    fn only_the_stages_the_target_needs() {
        let dockerfile = "\
FROM busybox AS deps
RUN make deps
FROM busybox AS tools
RUN make tools
FROM deps AS build
RUN --mount=type=cache,target=/c --mount=type=bind,from=tools,source=/t,target=/t make
FROM build AS test
RUN make test
FROM busybox AS assets
FROM busybox
COPY --from=build /app /app
COPY --from=4 /x /x
";
        assert_eq!(
            intermediate_stages(dockerfile, None, true),
            ["deps", "tools", "build", "assets"]
        );
        assert_eq!(
            intermediate_stages(dockerfile, None, false),
            ["deps", "tools", "build", "test", "assets"]
        );
        assert_eq!(
            intermediate_stages(dockerfile, Some("build"), true),
            ["deps", "tools"]
        );
    }
}
