//! Building a release's images.
//!
//! Every service with `build:` is built with the classic builder (see the engine module for why),
//! one after the other, before anything is stopped. For each one deployd sends:
//!
//! - the context directory as a streamed tar honouring `.dockerignore`;
//! - the compose `args` plus `GIT_COMMIT_HASH` (the release's commit, when known);
//! - the compose `labels` plus `deployd.project`, `deployd.release`, `deployd.commit`;
//! - `cache_from`: the compose list plus, when they exist, the `image:` tag, this release's tag
//!   (a retried release) and the previous release's image (`<image-repo>:<previous-release-id>`),
//!   so unchanged steps hit even after the builder cache was pruned; nothing and `nocache` on a forced rebuild, or when the operator
//!   cleared the caches since the previous release was built (a marker file written by
//!   `clear_cache` into that release's directory).
//!
//! The image is tagged `<image-repo>:<release-id>` (what rollback and retention use) and `image:`
//! itself (`watchparty-backend:latest`). Build output goes to tracing at debug level; the report
//! counts the steps and the steps that were cache hits ("Using cache").

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion, TagImageOptionsBuilder};
use futures_util::StreamExt;

use super::compose::{Project, Service, split_image};
use super::context::stream_context;
use super::engine::Engine;
use super::error::{ContainerError, is_not_found};
use super::{CACHE_CLEARED_MARKER, ReleaseRef};

/// What one deployment's builds did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildReport {
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
    /// The cache sources that were passed.
    pub cache_from: Vec<String>,
    /// Whether the build ran with `nocache`.
    pub no_cache: bool,
    pub duration: Duration,
}

/// `<image-repo>:<release-id>` for a service.
pub fn release_image(service: &Service, release_id: &str) -> String {
    format!("{}:{release_id}", split_image(&service.image).0)
}

/// Counts build steps and cache hits in the classic builder's output.
#[derive(Debug, Default)]
struct StepCounter {
    partial: String,
    steps: usize,
    from_steps: usize,
    hits: usize,
    image_id: Option<String>,
}

impl StepCounter {
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
            self.steps += 1;
            if rest
                .split_once(" : ")
                .is_some_and(|(_, i)| i.trim_start().to_ascii_uppercase().starts_with("FROM "))
            {
                self.from_steps += 1;
            }
        } else if line.trim() == "---> Using cache" {
            self.hits += 1;
        } else if let Some(id) = line.strip_prefix("Successfully built ") {
            self.image_id.get_or_insert_with(|| id.trim().to_string());
        }
    }

    fn finish(&mut self, service: &str) {
        let rest = std::mem::take(&mut self.partial);
        self.line(service, rest.trim_end());
    }
}

impl Engine {
    /// Build every service with `build:`. Nothing is stopped or started.
    pub async fn build(
        &self,
        project: &Project,
        release: &ReleaseRef<'_>,
        previous: Option<&ReleaseRef<'_>>,
        force: bool,
    ) -> Result<BuildReport, ContainerError> {
        let cache_cleared = previous.is_some_and(|p| p.dir.join(CACHE_CLEARED_MARKER).exists());
        if cache_cleared {
            tracing::info!(
                project = %project.name,
                "caches were cleared since the previous release, building without cache"
            );
        }
        let mut report = BuildReport::default();
        for service in project.services.iter().filter(|s| s.build.is_some()) {
            let no_cache = force || cache_cleared;
            let built = self
                .build_service(project, service, release, previous, no_cache)
                .await?;
            report.services.push(built);
        }
        Ok(report)
    }

    async fn build_service(
        &self,
        project: &Project,
        service: &Service,
        release: &ReleaseRef<'_>,
        previous: Option<&ReleaseRef<'_>>,
        no_cache: bool,
    ) -> Result<ServiceBuild, ContainerError> {
        let Some(spec) = &service.build else {
            return Err(ContainerError::Internal {
                action: format!("building service `{}`", service.name),
                message: "the service has no build section".into(),
            });
        };
        let started = Instant::now();
        let tag = release_image(service, release.id);
        let failed = |message: String| ContainerError::BuildFailed {
            service: service.name.clone(),
            image: tag.clone(),
            message,
        };
        let mut cache_from = Vec::new();
        if !no_cache {
            cache_from.extend(spec.cache_from.iter().cloned());
            // The image's own tag and this release's tag (a retried release) when they exist,
            // then the previous release's image: with `cache_from` set, the classic builder only
            // takes cache from the listed images.
            let mut extra = vec![service.image.clone(), tag.clone()];
            if let Some(prev) = previous {
                extra.push(release_image(service, prev.id));
            }
            for image in extra {
                if !cache_from.contains(&image) && self.image_id(&image).await?.is_some() {
                    cache_from.push(image);
                }
            }
        }
        let mut args: HashMap<String, String> = spec
            .args
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(commit) = release.commit {
            args.insert("GIT_COMMIT_HASH".into(), commit.to_string());
        }
        let mut labels: HashMap<String, String> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert("deployd.project".into(), project.name.clone());
        labels.insert("deployd.release".into(), release.id.to_string());
        labels.insert(
            "deployd.commit".into(),
            release.commit.unwrap_or("unknown").to_string(),
        );
        let mut options = BuildImageOptionsBuilder::new()
            .dockerfile(&spec.dockerfile)
            .t(&tag)
            .rm(true)
            .forcerm(true)
            .nocache(no_cache)
            .buildargs(&args)
            .labels(&labels)
            .version(BuilderVersion::BuilderV1);
        if !cache_from.is_empty() {
            options = options.cachefrom(&cache_from);
        }
        if let Some(target) = &spec.target {
            options = options.target(target);
        }
        tracing::info!(
            project = %project.name,
            service = %service.name,
            image = %tag,
            ?cache_from,
            no_cache,
            "building image"
        );
        let context = stream_context(spec.context.clone(), spec.dockerfile.clone());
        let mut stream = self.docker.build_image(
            options.build(),
            None,
            Some(bollard::body_stream(context.body)),
        );
        let mut counter = StepCounter::default();
        let mut aux_id = None;
        let mut error = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = &info.stream {
                        counter.feed(&service.name, text);
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
        // A context that could not be read explains a failed build better than the engine does.
        match written {
            Ok(Err(e)) => return Err(e),
            Err(e) if error.is_some() => return Err(e),
            _ => {}
        }
        if let Some(message) = error {
            return Err(failed(message.trim().to_string()));
        }
        let image_id = match aux_id.or(counter.image_id.clone()) {
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
            steps: counter.steps,
            cacheable_steps: counter.steps - counter.from_steps,
            cache_hits: counter.hits,
            cache_from,
            no_cache,
            duration: started.elapsed(),
        };
        tracing::info!(
            project = %project.name,
            service = %built.service,
            image = %built.image,
            image_id = %built.image_id,
            steps = built.steps,
            cache_hits = built.cache_hits,
            duration = ?built.duration,
            "image built"
        );
        Ok(built)
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

/// Whether `dir` holds the marker that `clear_cache` leaves in release directories.
pub fn cache_cleared(dir: &Path) -> bool {
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
    }
}
