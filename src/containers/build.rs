//! Building a release's images.
//!
//! Every service with `build:` is built with the classic builder (see the engine module for why),
//! one after the other, before anything is stopped. For each one deployd sends:
//!
//! - the context directory as a streamed tar honouring `.dockerignore`;
//! - the compose `args` plus `GIT_COMMIT_HASH` (the release's commit, when known);
//! - the compose `labels` plus `deployd.project`, `deployd.release`, `deployd.commit`;
//! - `cache_from`: the compose list plus, when they exist, the `image:` tag, this release's tags
//!   (a retried release) and the previous release's images (`<image-repo>:<previous-release-id>`
//!   and its stage images), so unchanged steps hit even after the builder cache was pruned;
//!   nothing and `nocache` on a forced rebuild, or when the operator cleared the caches since the
//!   previous release was built (a marker file written by `clear_cache` into that release's
//!   directory).
//!
//! A multi-stage Dockerfile is built one named stage at a time (`target=<stage>`), each stage
//! tagged `<image-repo>:<release-id>-stage-<name>` and added to the `cache_from` of the builds
//! after it. With `cache_from` set the classic builder reuses only layers in the listed images'
//! own history, and a final image holds none of its earlier stages' layers: without the stage
//! images every earlier stage (typically the dependency install) would run again on every
//! deployment. Cache stays correct because the engine decides each hit from the instruction and
//! the content it copies; deployd only offers candidates. Stage builds pass no labels (each
//! label costs the classic builder one more step); retention and `clear-cache` find stage images
//! by their tags and treat them like the release's own image.
//!
//! The image is tagged `<image-repo>:<release-id>` (what rollback and retention use) and `image:`
//! itself (`watchparty-backend:latest`). Build output goes to tracing at debug level; the report
//! counts the steps and the steps that were cache hits ("Using cache").

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion, TagImageOptionsBuilder};
use futures_util::StreamExt;

use super::compose::{BuildSpec, Project, Service, split_image};
use super::context::stream_context;
use super::engine::Engine;
use super::error::{ContainerError, is_connection_error, is_not_found};
use super::{CACHE_CLEARED_MARKER, ReleaseRef};

/// What one deployment's builds did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildReport {
    /// One entry per service with `build:`, in start order.
    pub services: Vec<ServiceBuild>,
}

impl BuildReport {
    /// Cache hits over all services.
    pub fn cache_hits(&self) -> usize {
        self.services.iter().map(|s| s.cache_hits).sum()
    }
}

/// What the build of one service did.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceBuild {
    /// The compose service.
    pub service: String,
    /// `<image-repo>:<release-id>`.
    pub image: String,
    /// The built image id (`sha256:...`).
    pub image_id: String,
    /// Build steps run (`Step n/m` lines).
    pub steps: usize,
    /// Steps that can be cached (all but `FROM`).
    pub cacheable_steps: usize,
    /// Steps that were cache hits.
    pub cache_hits: usize,
    /// The cache sources the final build was given.
    pub cache_from: Vec<String>,
    /// Named intermediate stages built and tagged before the final image.
    pub stages: Vec<String>,
    /// Whether the build ran with `nocache`.
    pub no_cache: bool,
    /// Wall time of all the service's builds, stages included.
    pub duration: Duration,
}

/// Told `(service, step, steps)` as a build reaches each step: a progress bar's input.
pub type OnStep = std::sync::Arc<dyn Fn(&str, usize, usize) + Send + Sync>;

/// The engine's [`OnStep`], if one was set.
#[derive(Clone, Default)]
pub(crate) struct StepHook(Option<OnStep>);

impl std::fmt::Debug for StepHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "StepHook(set)"
        } else {
            "StepHook"
        })
    }
}

/// `<image-repo>:<release-id>` for a service.
pub(crate) fn release_image(service: &Service, release_id: &str) -> String {
    format!("{}:{release_id}", split_image(&service.image).0)
}

/// `<image-repo>:<release-id>-stage-<stage>`: the image of one named intermediate stage.
fn stage_image(service: &Service, release_id: &str, stage: &str) -> String {
    format!(
        "{}:{release_id}-stage-{stage}",
        split_image(&service.image).0
    )
}

/// The named stages a build of `target` (else of the last stage) runs before it, in file
/// order, lower-cased as the engine matches them. Empty for a single-stage Dockerfile, for an
/// unknown target and for a Dockerfile that does not parse: the build itself then reports what
/// is wrong, and the only cost of an empty list is cache that is not reused.
fn intermediate_stages(dockerfile: &str, target: Option<&str>) -> Vec<String> {
    let Ok(parsed) = parse_dockerfile::parse(dockerfile) else {
        return Vec::new();
    };
    let names: Vec<Option<String>> = parsed
        .stages()
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
    names[..end]
        .iter()
        .flatten()
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .cloned()
        .collect()
}

/// Whether `image`'s tag is one the engine accepts (at most 128 characters).
fn tag_fits(image: &str) -> bool {
    split_image(image).1.len() <= 128
}

/// Counts build steps and cache hits in the classic builder's output.
///
/// A build of one stage prints the steps of every stage before it too (`Step n/m` numbers run
/// across the whole Dockerfile); steps numbered up to `skip_upto` were counted by the build of an
/// earlier stage of the same service and are not counted again. The builder appends one
/// `LABEL key=value` step per label deployd passes; those are not the Dockerfile's steps (and
/// never hit, since the release label changes), so they are left out.
#[derive(Debug, Default)]
struct StepCounter {
    partial: String,
    skip_upto: usize,
    /// Keys of the labels passed with the build.
    label_keys: Vec<String>,
    counting: bool,
    steps: usize,
    from_steps: usize,
    hits: usize,
    /// The number of the last step that is the Dockerfile's own.
    last_own: usize,
    /// The step the build is at and the number of steps, as the builder numbers them.
    at: Option<(usize, usize)>,
    image_id: Option<String>,
}

impl StepCounter {
    fn new(skip_upto: usize, label_keys: Vec<String>) -> Self {
        Self {
            skip_upto,
            label_keys,
            ..Self::default()
        }
    }

    /// Whether `instruction` is a label step the builder appended for a passed label.
    fn appended_label(&self, instruction: &str) -> bool {
        let Some(rest) = instruction.strip_prefix("LABEL ") else {
            return false;
        };
        let key = rest
            .split_once('=')
            .map_or(rest, |(k, _)| k)
            .trim()
            .trim_matches('"');
        self.label_keys.iter().any(|k| k == key)
    }

    fn feed(&mut self, service: &str, text: &str) {
        self.partial.push_str(text);
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            self.line(service, line.trim_end());
        }
    }

    fn line(&mut self, service: &str, line: &str) {
        if line.is_empty() {
            return;
        }
        tracing::debug!(service, "{line}");
        if let Some(rest) = line.strip_prefix("Step ") {
            let (number, instruction) = rest.split_once(" : ").unwrap_or((rest, ""));
            let instruction = instruction.trim_start();
            let (n, of) = number.split_once('/').unwrap_or((number, ""));
            let n = n.trim().parse::<usize>().unwrap_or(usize::MAX);
            if let Ok(of) = of.trim().parse::<usize>() {
                self.at = Some((n.min(of), of));
            }
            let own = !self.appended_label(instruction);
            if own && n != usize::MAX {
                self.last_own = self.last_own.max(n);
            }
            self.counting = own && n > self.skip_upto;
            if self.counting {
                self.steps += 1;
                if instruction.to_ascii_uppercase().starts_with("FROM ") {
                    self.from_steps += 1;
                }
            }
        } else if line.trim() == "---> Using cache" {
            if self.counting {
                self.hits += 1;
            }
        } else if let Some(id) = line.strip_prefix("Successfully built ") {
            self.image_id.get_or_insert_with(|| id.trim().to_string());
        }
    }

    fn finish(&mut self, service: &str) {
        let rest = std::mem::take(&mut self.partial);
        self.line(service, rest.trim_end());
    }
}

/// One request to the engine's build endpoint: the final image of a service, or one of its
/// intermediate stages.
struct BuildRun<'a> {
    tag: &'a str,
    target: Option<&'a str>,
    cache_from: &'a Vec<String>,
    no_cache: bool,
    /// Steps already counted by an earlier stage's build (see [`StepCounter`]).
    skip_upto: usize,
    /// An intermediate stage's build (no labels), not the service's final image.
    stage: bool,
}

impl Engine {
    /// This engine, telling `on_step` as each build reaches each step.
    pub fn with_step_hook(mut self, on_step: OnStep) -> Engine {
        self.on_step = StepHook(Some(on_step));
        self
    }

    /// Build every service with `build:`. Nothing is stopped or started.
    pub async fn build(
        &self,
        project: &Project,
        release: &ReleaseRef<'_>,
        previous: Option<&ReleaseRef<'_>>,
        force: bool,
    ) -> Result<BuildReport, ContainerError> {
        let cleared = previous.is_some_and(|p| cache_cleared(p.dir));
        if cleared {
            tracing::info!(
                project = %project.name,
                "caches were cleared since the previous release, building without cache"
            );
        }
        let mut report = BuildReport::default();
        for service in project.services.iter().filter(|s| s.build.is_some()) {
            let no_cache = force || cleared;
            let built = self
                .build_service(project, service, release, previous, no_cache)
                .await?;
            report.services.push(built);
        }
        Ok(report)
    }

    /// Build one service. A multi-stage Dockerfile is built one named stage at a time, each
    /// tagged `<repo>:<release>-stage-<name>`: with `cache_from` set the classic builder takes
    /// cache only from the listed images' own layers, and the final image holds none of the
    /// earlier stages' layers, so without those tags every earlier stage would be rebuilt.
    async fn build_service(
        &self,
        project: &Project,
        service: &Service,
        release: &ReleaseRef<'_>,
        previous: Option<&ReleaseRef<'_>>,
        no_cache: bool,
    ) -> Result<ServiceBuild, ContainerError> {
        let spec = build_spec(service)?;
        let started = Instant::now();
        let tag = release_image(service, release.id);
        let stages: Vec<String> = match std::fs::read_to_string(spec.context.join(&spec.dockerfile))
        {
            Ok(text) => intermediate_stages(&text, spec.target.as_deref())
                .into_iter()
                .filter(|s| tag_fits(&stage_image(service, release.id, s)))
                .collect(),
            // The build reports a missing or unreadable Dockerfile in its own words.
            Err(_) => Vec::new(),
        };
        let mut cache_from = Vec::new();
        if !no_cache {
            cache_from.extend(spec.cache_from.iter().cloned());
            // The image's own tag and this release's tags (a retried release) when they exist,
            // then the previous release's: with `cache_from` set, the classic builder only
            // takes cache from the listed images.
            let mut extra = vec![service.image.clone(), tag.clone()];
            for stage in &stages {
                extra.push(stage_image(service, release.id, stage));
            }
            if let Some(prev) = previous {
                extra.push(release_image(service, prev.id));
                for stage in &stages {
                    extra.push(stage_image(service, prev.id, stage));
                }
            }
            for image in extra {
                if !cache_from.contains(&image) && self.image_id(&image).await?.is_some() {
                    cache_from.push(image);
                }
            }
        }
        // Without cache, only the stages this deployment has just built are cache sources: the
        // first build runs with `nocache`, the later ones reuse nothing older than themselves.
        // The stages first, then the service's own image.
        let builds = stages
            .iter()
            .map(|s| (stage_image(service, release.id, s), Some(s.as_str()), true))
            .chain(std::iter::once((
                tag.clone(),
                spec.target.as_deref(),
                false,
            )));
        let mut fresh: Vec<String> = Vec::new();
        let mut counted = StepCounter::default();
        let mut sources = Vec::new();
        for (image, target, stage) in builds {
            sources = if no_cache {
                fresh.clone()
            } else {
                cache_from.clone()
            };
            let out = self
                .run_build(
                    project,
                    service,
                    release,
                    BuildRun {
                        tag: &image,
                        target,
                        cache_from: &sources,
                        no_cache: no_cache && fresh.is_empty(),
                        skip_upto: counted.last_own,
                        stage,
                    },
                )
                .await?;
            counted.steps += out.steps;
            counted.from_steps += out.from_steps;
            counted.hits += out.hits;
            counted.last_own = out.last_own;
            counted.image_id = out.image_id;
            if stage {
                if !no_cache && !cache_from.contains(&image) {
                    cache_from.push(image.clone());
                }
                fresh.push(image);
            }
        }
        let failed = |message: String| ContainerError::BuildFailed {
            service: service.name.clone(),
            image: tag.clone(),
            message,
        };
        let image_id = match counted.image_id {
            Some(id) => id,
            None => self
                .image_id(&tag)
                .await?
                .ok_or_else(|| failed("the engine reported no image".into()))?,
        };
        let (repo, image_tag) = split_image(&service.image);
        self.docker
            .tag_image(
                &tag,
                Some(
                    TagImageOptionsBuilder::new()
                        .repo(repo)
                        .tag(image_tag)
                        .build(),
                ),
            )
            .await
            .map_err(|e| {
                ContainerError::engine(format!("tagging {tag} as {}", service.image), e)
            })?;
        let built = ServiceBuild {
            service: service.name.clone(),
            image: tag,
            image_id,
            steps: counted.steps,
            cacheable_steps: counted.steps - counted.from_steps,
            cache_hits: counted.hits,
            cache_from: sources,
            stages,
            no_cache,
            duration: started.elapsed(),
        };
        tracing::info!(
            project = %project.name,
            service = %built.service,
            image = %built.image,
            image_id = %built.image_id,
            stages = built.stages.len(),
            steps = built.steps,
            cache_hits = built.cache_hits,
            duration = ?built.duration,
            "image built"
        );
        Ok(built)
    }

    /// Send one build to the engine and follow its output to the end.
    async fn run_build(
        &self,
        project: &Project,
        service: &Service,
        release: &ReleaseRef<'_>,
        run: BuildRun<'_>,
    ) -> Result<StepCounter, ContainerError> {
        let spec = build_spec(service)?;
        let failed = |message: String| ContainerError::BuildFailed {
            service: service.name.clone(),
            image: run.tag.to_string(),
            message,
        };
        let mut args: HashMap<String, String> = spec
            .args
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(commit) = release.commit {
            args.insert("GIT_COMMIT_HASH".into(), commit.to_string());
        }
        // Only the final image is labelled: the classic builder appends one build step per
        // label, and stage images are found by their tags instead (see the cache module).
        let mut labels: HashMap<String, String> = HashMap::new();
        if !run.stage {
            labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            labels.insert("deployd.project".into(), project.name.clone());
            labels.insert("deployd.release".into(), release.id.to_string());
            labels.insert(
                "deployd.commit".into(),
                release.commit.unwrap_or("unknown").to_string(),
            );
        }
        let mut options = BuildImageOptionsBuilder::new()
            .dockerfile(&spec.dockerfile)
            .t(run.tag)
            .rm(true)
            .forcerm(true)
            .nocache(run.no_cache)
            .buildargs(&args)
            .labels(&labels)
            .version(BuilderVersion::BuilderV1);
        if !run.cache_from.is_empty() {
            options = options.cachefrom(run.cache_from);
        }
        if let Some(target) = run.target {
            options = options.target(target);
        }
        tracing::info!(
            project = %project.name,
            service = %service.name,
            image = %run.tag,
            target = run.target.unwrap_or(""),
            cache_from = ?run.cache_from,
            no_cache = run.no_cache,
            "building image"
        );
        let context = stream_context(spec.context.clone(), spec.dockerfile.clone());
        let mut stream = self.docker.build_image(
            options.build(),
            None,
            Some(bollard::body_stream(context.body)),
        );
        let mut counter = StepCounter::new(run.skip_upto, labels.keys().cloned().collect());
        let mut aux_id = None;
        let mut error = None;
        let mut told = None;
        let mut lost = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = &info.stream {
                        counter.feed(&service.name, text);
                        if let (Some(on_step), Some((step, steps))) = (&self.on_step.0, counter.at)
                            && told != counter.at
                        {
                            told = counter.at;
                            on_step(&service.name, step, steps);
                        }
                    }
                    if let Some(id) = info.aux.and_then(|a| a.id) {
                        aux_id = Some(id);
                    }
                    if let Some(detail) = info.error_detail {
                        error = Some(detail.message.unwrap_or_default());
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error: e }) => {
                    error = Some(e);
                }
                // The engine went away mid-build (restarting, crashed): not the release's fault.
                Err(e) if is_connection_error(&e) => {
                    lost = Some(e);
                    break;
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        drop(stream);
        counter.finish(&service.name);
        let written = context.writer.await.map_err(|e| ContainerError::Internal {
            action: format!("sending the build context of service `{}`", service.name),
            message: e.to_string(),
        });
        if let Some(e) = lost {
            return Err(ContainerError::engine(
                format!(
                    "building image {} (the connection to the engine broke)",
                    run.tag
                ),
                e,
            ));
        }
        // A context that could not be read explains a failed build better than the engine does.
        match written {
            Ok(Err(e)) => return Err(e),
            Err(e) if error.is_some() => return Err(e),
            _ => {}
        }
        if let Some(message) = error {
            return Err(failed(message.trim().to_string()));
        }
        if aux_id.is_some() {
            counter.image_id = aux_id;
        }
        Ok(counter)
    }

    /// The id of an image, or `None` when the engine does not have it.
    pub(crate) async fn image_id(&self, image: &str) -> Result<Option<String>, ContainerError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(ContainerError::engine(
                format!("inspecting image {image}"),
                e,
            )),
        }
    }
}

/// A service's `build:`; only services that have one are built.
fn build_spec(service: &Service) -> Result<&BuildSpec, ContainerError> {
    service
        .build
        .as_ref()
        .ok_or_else(|| ContainerError::Internal {
            action: format!("building service `{}`", service.name),
            message: "the service has no build section".into(),
        })
}

/// Whether `dir` holds the marker that `clear_cache` leaves in release directories.
fn cache_cleared(dir: &Path) -> bool {
    dir.join(CACHE_CLEARED_MARKER).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_steps_across_chunks() {
        let mut c = StepCounter::default();
        c.feed("s", "Step 1/3 : FROM base\n ---> abc\nStep 2/3 : RU");
        c.feed(
            "s",
            "N echo\n ---> Using cache\n ---> def\nStep 3/3 : COPY a b\n",
        );
        c.feed("s", " ---> 123\nSuccessfully built 123\n");
        c.finish("s");
        assert_eq!((c.steps, c.from_steps, c.hits), (3, 1, 1));
        assert_eq!(c.image_id.as_deref(), Some("123"));
        assert_eq!(c.last_own, 3);
    }

    #[test]
    fn steps_an_earlier_stage_build_counted_are_skipped() {
        // A build of the final stage prints the first stage's steps again (all cache hits).
        let mut c = StepCounter::new(2, vec!["deployd.release".into()]);
        c.feed(
            "s",
            "Step 1/5 : FROM base AS deps\n ---> abc\nStep 2/5 : RUN make deps\n ---> Using cache\n",
        );
        c.feed(
            "s",
            "Step 3/5 : FROM base\n ---> abc\nStep 4/5 : COPY --from=deps /d /d\n ---> Using cache\n",
        );
        c.feed("s", "Step 5/6 : COPY src /src\n ---> 9f\n");
        c.feed("s", "Step 6/6 : LABEL deployd.release=r2\n ---> 9a\n");
        c.finish("s");
        assert_eq!((c.steps, c.from_steps, c.hits, c.last_own), (3, 1, 1, 5));
    }

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
            intermediate_stages(dockerfile, None),
            ["deps", "build", "test"]
        );
        assert_eq!(intermediate_stages(dockerfile, Some("BUILD")), ["deps"]);
        assert_eq!(
            intermediate_stages(dockerfile, Some("deps")),
            Vec::<String>::new()
        );
        assert_eq!(
            intermediate_stages(dockerfile, Some("nope")),
            Vec::<String>::new()
        );
        assert_eq!(
            intermediate_stages("FROM busybox\nRUN true\n", None),
            Vec::<String>::new()
        );
        assert_eq!(
            intermediate_stages("RUN before from\n", None),
            Vec::<String>::new()
        );
    }
}
