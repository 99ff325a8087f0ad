//! The classic builder (`/build?version=1`), the fallback where the engine has no BuildKit.
//!
//! A multi-stage Dockerfile is built one named stage at a time, each stage tagged and added to
//! the `cache_from` of the builds after it: with `cache_from` set the classic builder takes cache
//! only from the listed images' own layers, and the final image holds none of the earlier
//! stages' layers. Steps and hits are counted from its output (`Step n/m`, `Using cache`).

use bollard::query_parameters::BuilderVersion;
use futures_util::StreamExt;

use super::{BuildRun, Job, Outcome, build_options};
use crate::containers::context::stream_context;
use crate::containers::engine::{Builder, Engine};
use crate::containers::error::{ContainerError, is_connection_error};

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

impl Engine {
    /// Build a service's stages, then its image, with the classic builder.
    pub(super) async fn classic_service(&self, job: &Job<'_>) -> Result<Outcome, ContainerError> {
        let mut cache_from = job.cache_from.clone();
        // Without cache, only the stages this deployment has just built are cache sources: the
        // first build runs with `nocache`, the later ones reuse nothing older than themselves.
        // The stages first, then the service's own image.
        let mut fresh: Vec<String> = Vec::new();
        let mut outcome = Outcome::default();
        let mut last_own = 0;
        for (image, target, stage) in job.builds() {
            let sources = if job.no_cache {
                fresh.clone()
            } else {
                cache_from.clone()
            };
            let run = BuildRun {
                tag: &image,
                target,
                cache_from: &sources,
                no_cache: job.no_cache && fresh.is_empty(),
                stage,
            };
            let out = self.classic_run(job, &run, last_own).await?;
            outcome.steps += out.steps;
            outcome.from_steps += out.from_steps;
            outcome.hits += out.hits;
            outcome.image_id = out.image_id;
            last_own = out.last_own;
            outcome.cache_from = sources;
            if stage {
                if !job.no_cache && !cache_from.contains(&image) {
                    cache_from.push(image.clone());
                }
                fresh.push(image);
            }
        }
        outcome.stages = job.stages.clone();
        Ok(outcome)
    }

    /// Send one build to the engine and follow its output to the end. Steps numbered up to
    /// `skip_upto` were counted by an earlier stage's build.
    async fn classic_run(
        &self,
        job: &Job<'_>,
        run: &BuildRun<'_>,
        skip_upto: usize,
    ) -> Result<StepCounter, ContainerError> {
        let options = build_options(job, run, Builder::Classic);
        debug_assert!(options.version == BuilderVersion::BuilderV1);
        let label_keys = options
            .labels
            .as_ref()
            .map(|l| l.keys().cloned().collect())
            .unwrap_or_default();
        let context = stream_context(job.spec.context.clone(), job.spec.dockerfile.clone());
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_stream(context.body)));
        let service = &job.service.name;
        let mut counter = StepCounter::new(skip_upto, label_keys);
        let mut aux_id = None;
        let mut error = None;
        let mut lost = None;
        let mut told = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = &info.stream {
                        counter.feed(service, text);
                        if let Some(at) = counter.at
                            && told != counter.at
                        {
                            told = counter.at;
                            self.on_step.tell(service, at);
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
                // The engine went away: that is not the Dockerfile's fault.
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
        counter.finish(service);
        let written = context.writer.await.map_err(|e| ContainerError::Internal {
            action: format!("sending the build context of service `{service}`"),
            message: e.to_string(),
        });
        // An engine that went away explains everything after it (the context writer then fails
        // with "build aborted"); otherwise a context that could not be read explains a failed
        // build better than the engine does.
        if let Some(e) = lost {
            return Err(ContainerError::engine(
                format!("building image {} of service `{service}`", run.tag),
                e,
            ));
        }
        match written {
            Ok(Err(e)) => return Err(e),
            Err(e) if error.is_some() => return Err(e),
            _ => {}
        }
        if let Some(message) = error {
            return Err(job.failed(run.tag, message.trim().to_string()));
        }
        if aux_id.is_some() {
            counter.image_id = aux_id;
        }
        Ok(counter)
    }
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
}
