//! Building a release's images.
//!
//! Every service with `build:` is built, one after the other, before anything is stopped, with
//! the builder the engine module decided: BuildKit wherever the engine has it (the `buildkit`
//! module), else the classic builder (the `classic` module). For each one deployd sends:
//!
//! - the context directory as a streamed tar honouring `.dockerignore`, in the request body (no
//!   BuildKit session);
//! - the compose `args` plus `GIT_COMMIT_HASH` (the release's commit, when known) and, for
//!   BuildKit, `BUILDKIT_INLINE_CACHE=1`: the image carries the cache metadata that lets the next
//!   release's build take cache from it;
//! - the compose `labels` plus `deployd.project`, `deployd.release`, `deployd.commit`;
//! - `cache_from`: the compose list plus, when they exist, the `image:` tag, this release's tags
//!   (a retried release) and the previous release's images (`<image-repo>:<previous-release-id>`
//!   and its stage images), so unchanged steps hit even after the builder cache was pruned;
//!   nothing and `nocache` on a forced rebuild, or when the operator cleared the caches since the
//!   previous release was built (a marker file written by `clear_cache` into that release's
//!   directory).
//!
//! Multi-stage Dockerfiles: a final image holds none of its earlier stages' layers, and BuildKit's
//! inline cache describes only the final image's, so each named stage is also tagged as an image
//! of its own, `<image-repo>:<release-id>-stage-<name>`, and offered as a cache source to the next
//! release: the dependency stage is reused after a code-only change even when the builder cache
//! was pruned. The classic builder builds the stages first, one at a time (`target=<stage>`), each
//! added to the `cache_from` of the builds after it (with `cache_from` set it reuses only layers
//! in the listed images' own history). BuildKit builds the final image first, then tags each stage
//! that build used with a build of that stage alone, which its own cache answers at once; stages
//! the final image does not need are not built. Cache stays correct because the engine decides
//! each hit from the instruction and the content it copies; deployd only offers candidates.
//! Stage builds pass no labels; retention and `clear-cache` find stage images by their tags and
//! treat them like the release's own image.
//!
//! The image is tagged `<image-repo>:<release-id>` (what rollback and retention use) and `image:`
//! itself (`watchparty-backend:latest`). Build output goes to tracing at debug level; the report
//! counts the Dockerfile's steps and the steps that were cache hits, from the decoded BuildKit
//! progress (or the classic builder's "Using cache" lines).

mod buildkit;
mod classic;
mod progress;
mod stages;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    BuildImageOptions, BuildImageOptionsBuilder, BuilderVersion, TagImageOptionsBuilder,
};

use super::compose::{BuildSpec, Project, Service, split_image};
use super::engine::{Builder, Engine};
use super::error::{ContainerError, is_not_found};
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
    /// The builder that built it.
    pub builder: Builder,
    /// The Dockerfile's steps the build ran or took from cache (`[stage n/m]` vertices of
    /// BuildKit, `Step n/m` lines of the classic builder).
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

impl StepHook {
    /// Tells the hook, if any, that `service` is at `step` of `steps`.
    pub(crate) fn tell(&self, service: &str, (step, steps): (usize, usize)) {
        if let Some(on_step) = &self.0 {
            on_step(service, step, steps);
        }
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

/// Whether `image`'s tag is one the engine accepts (at most 128 characters).
fn tag_fits(image: &str) -> bool {
    split_image(image).1.len() <= 128
}

/// One service's build, as both builders see it.
struct Job<'a> {
    project: &'a Project,
    service: &'a Service,
    spec: &'a BuildSpec,
    release: &'a ReleaseRef<'a>,
    /// `<image-repo>:<release-id>`.
    tag: String,
    /// The Dockerfile's text, when it could be read (the build reports it otherwise).
    dockerfile: Option<String>,
    /// The named stages before the target (see [`stages::intermediate_stages`]).
    stages: Vec<String>,
    /// Cache sources for the builds: empty without cache.
    cache_from: Vec<String>,
    /// A forced rebuild, or the first build after `clear-cache`.
    no_cache: bool,
}

impl Job<'_> {
    fn stage_image(&self, stage: &str) -> String {
        stage_image(self.service, self.release.id, stage)
    }

    /// The builds of the service, in order: each stage image (`target=<stage>`), then the
    /// service's own image; as `(image, target, is a stage)`.
    fn builds(&self) -> impl Iterator<Item = (String, Option<&str>, bool)> + '_ {
        self.stages
            .iter()
            .map(|s| (self.stage_image(s), Some(s.as_str()), true))
            .chain(std::iter::once((
                self.tag.clone(),
                self.spec.target.as_deref(),
                false,
            )))
    }

    fn failed(&self, image: &str, message: String) -> ContainerError {
        ContainerError::BuildFailed {
            service: self.service.name.clone(),
            image: image.to_string(),
            message,
        }
    }
}

/// One request to the engine's build endpoint: the final image of a service, or one of its
/// intermediate stages.
struct BuildRun<'a> {
    tag: &'a str,
    target: Option<&'a str>,
    cache_from: &'a Vec<String>,
    no_cache: bool,
    /// An intermediate stage's build (no labels), not the service's final image.
    stage: bool,
}

/// What a builder did for one service: steps counted once each, over all its requests.
#[derive(Debug, Default)]
struct Outcome {
    steps: usize,
    from_steps: usize,
    hits: usize,
    image_id: Option<String>,
    /// The cache sources of the build that made the final image.
    cache_from: Vec<String>,
    /// The stage images tagged.
    stages: Vec<String>,
}

/// The query of one build request: the same for both builders but for `version` and, for
/// BuildKit, the inline cache build argument.
fn build_options(job: &Job<'_>, run: &BuildRun<'_>, builder: Builder) -> BuildImageOptions {
    let mut args: HashMap<String, String> = job
        .spec
        .args
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(commit) = job.release.commit {
        args.insert("GIT_COMMIT_HASH".into(), commit.to_string());
    }
    if builder == Builder::BuildKit {
        args.insert("BUILDKIT_INLINE_CACHE".into(), "1".into());
    }
    // Only the final image is labelled: the classic builder appends one build step per label,
    // and stage images are found by their tags instead (see the cache module).
    let mut labels: HashMap<String, String> = HashMap::new();
    if !run.stage {
        labels.extend(job.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels.insert("deployd.project".into(), job.project.name.clone());
        labels.insert("deployd.release".into(), job.release.id.to_string());
        labels.insert(
            "deployd.commit".into(),
            job.release.commit.unwrap_or("unknown").to_string(),
        );
    }
    let version = match builder {
        Builder::BuildKit => BuilderVersion::BuilderBuildKit,
        Builder::Classic => BuilderVersion::BuilderV1,
    };
    let mut options = BuildImageOptionsBuilder::new()
        .dockerfile(&job.spec.dockerfile)
        .t(run.tag)
        .rm(true)
        .forcerm(true)
        .nocache(run.no_cache)
        .buildargs(&args)
        .labels(&labels)
        .version(version);
    if !run.cache_from.is_empty() {
        options = options.cachefrom(run.cache_from);
    }
    if let Some(target) = run.target {
        options = options.target(target);
    }
    tracing::info!(
        project = %job.project.name,
        service = %job.service.name,
        image = %run.tag,
        builder = ?builder,
        target = run.target.unwrap_or(""),
        cache_from = ?run.cache_from,
        no_cache = run.no_cache,
        "building image"
    );
    options.build()
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

    /// Build one service, its stage images included, and tag it as its `image:`.
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
        // The build reports a missing or unreadable Dockerfile in its own words.
        let dockerfile = std::fs::read_to_string(spec.context.join(&spec.dockerfile)).ok();
        let stages: Vec<String> = dockerfile
            .as_deref()
            .map(|text| {
                // BuildKit builds only the stages the target needs; the classic builder all.
                let needed_only = self.decision.builder == Builder::BuildKit;
                stages::intermediate_stages(text, spec.target.as_deref(), needed_only)
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|s| tag_fits(&stage_image(service, release.id, s)))
            .collect();
        let mut job = Job {
            project,
            service,
            spec,
            release,
            tag,
            dockerfile,
            stages,
            cache_from: Vec::new(),
            no_cache,
        };
        if !no_cache {
            job.cache_from = self.cache_sources(&job, previous).await?;
        }
        // A retried release: its image, to keep if the build makes the same one again.
        let before = self.image_id(&job.tag).await?;
        let builder = self.decision.builder;
        let outcome = match builder {
            Builder::BuildKit => self.buildkit_service(&job).await?,
            Builder::Classic => self.classic_service(&job).await?,
        };
        let image_id = match outcome.image_id {
            Some(id) => id,
            None => self
                .image_id(&job.tag)
                .await?
                .ok_or_else(|| job.failed(&job.tag, "the engine reported no image".into()))?,
        };
        let image_id = match before {
            Some(old) if old != image_id && self.same_image(&old, &image_id).await? => {
                self.tag(&old, &job.tag).await?;
                old
            }
            _ => image_id,
        };
        self.tag(&job.tag, &service.image).await?;
        let built = ServiceBuild {
            service: service.name.clone(),
            image: job.tag,
            image_id,
            builder,
            steps: outcome.steps,
            cacheable_steps: outcome.steps - outcome.from_steps,
            cache_hits: outcome.hits,
            cache_from: outcome.cache_from,
            stages: outcome.stages,
            no_cache,
            duration: started.elapsed(),
        };
        tracing::info!(
            project = %project.name,
            service = %built.service,
            image = %built.image,
            image_id = %built.image_id,
            builder = ?builder,
            stages = built.stages.len(),
            steps = built.steps,
            cacheable_steps = built.cacheable_steps,
            cache_hits = built.cache_hits,
            duration = ?built.duration,
            "image built"
        );
        Ok(built)
    }

    /// `cache_from` for a service's builds: the compose list plus those of the `image:` tag,
    /// this release's tags (a retried release) and the previous release's that exist.
    async fn cache_sources(
        &self,
        job: &Job<'_>,
        previous: Option<&ReleaseRef<'_>>,
    ) -> Result<Vec<String>, ContainerError> {
        let mut cache_from = job.spec.cache_from.clone();
        let mut extra = vec![job.service.image.clone(), job.tag.clone()];
        extra.extend(job.stages.iter().map(|s| job.stage_image(s)));
        if let Some(prev) = previous {
            extra.push(release_image(job.service, prev.id));
            for stage in &job.stages {
                extra.push(stage_image(job.service, prev.id, stage));
            }
        }
        for image in extra {
            if !cache_from.contains(&image) && self.image_id(&image).await?.is_some() {
                cache_from.push(image);
            }
        }
        Ok(cache_from)
    }

    /// Whether two images have the same layers and configuration. BuildKit writes the inline
    /// cache metadata of an unchanged rebuild in another order, which makes another image id:
    /// the release's existing image is kept then, so its containers are left running.
    async fn same_image(&self, a: &str, b: &str) -> Result<bool, ContainerError> {
        let inspect = |id: String| async move {
            self.docker
                .inspect_image(&id)
                .await
                .map_err(|e| ContainerError::engine(format!("inspecting image {id}"), e))
        };
        let (a, b) = (inspect(a.to_string()).await?, inspect(b.to_string()).await?);
        let layers =
            |i: &bollard::models::ImageInspect| i.root_fs.as_ref().map(|r| r.layers.clone());
        Ok(layers(&a) == layers(&b) && a.config == b.config && a.os == b.os)
    }

    /// Tag `image` (an id or reference) as `reference`.
    async fn tag(&self, image: &str, reference: &str) -> Result<(), ContainerError> {
        let (repo, tag) = split_image(reference);
        self.docker
            .tag_image(
                image,
                Some(TagImageOptionsBuilder::new().repo(repo).tag(tag).build()),
            )
            .await
            .map_err(|e| ContainerError::engine(format!("tagging {image} as {reference}"), e))
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
