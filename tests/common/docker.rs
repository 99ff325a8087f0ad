//! Fixtures for container tests: a local busybox base image, a small web app release directory,
//! engine access that fails under CI when Docker does not answer, and cleanup.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use deployd::config::{ContainersConfig, HumanDuration};
use deployd::containers::{Engine, Project, ReleaseRef};

/// The base image every fixture Dockerfile starts from (no registry is reachable).
pub const BASE_IMAGE: &str = "deployd-test-busybox:1";

/// Tests that prune engine-wide caches take this for writing; all other Docker tests for reading.
pub static ENGINE_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Run a command, returning stdout; panics with stderr on failure.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `docker builder prune -af` (and with `images`, `docker image prune -f`), as an operator frees
/// space. The engine runs one prune at a time and other test runs may be pruning: retried.
pub fn operator_prune(images: bool) {
    for _ in 0..30 {
        let out = Command::new("docker")
            .args(["builder", "prune", "-af"])
            .output()
            .expect("spawn docker");
        if out.status.success() {
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("already running"),
            "builder prune: {stderr}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    if images {
        sh("docker image prune -f >/dev/null");
    }
}

/// Make the base image once (idempotent across tests and runs): busybox-static plus symlinks.
pub fn ensure_base_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    DONE.get_or_init(|| {
        if Command::new("docker")
            .args(["image", "inspect", BASE_IMAGE])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            return;
        }
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: apt-get install -y busybox-static"
        );
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in ["bin", "etc", "tmp", "www", "var/www"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::copy(busybox, r.join("bin/busybox")).unwrap();
        let list = sh("/bin/busybox --list");
        for applet in list.lines().filter(|a| *a != "busybox") {
            let _ = std::os::unix::fs::symlink("busybox", r.join("bin").join(applet));
        }
        std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
        std::fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
        sh(&format!(
            "tar -C {} -c . | docker import -c 'ENV PATH=/bin' - {BASE_IMAGE}",
            r.display()
        ));
    });
}

/// Connect to the engine; `None` (skip) when it does not answer, a failure when `CI` is set.
pub async fn engine() -> Option<Engine> {
    let ci = std::env::var_os("CI").is_some();
    let wait = if ci {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(3)
    };
    match Engine::connect(wait).await {
        Ok(e) => {
            ensure_base_image();
            Some(e)
        }
        Err(e) if ci => panic!("CI is set and the Docker engine does not answer: {e}"),
        Err(e) => {
            eprintln!("skipping: Docker engine does not answer: {e}");
            None
        }
    }
}

/// [`engine`] from a test without a runtime of its own: whether the engine answers (false:
/// skip), failing when `CI` is set and it does not.
pub fn engine_answers() -> bool {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(engine())
        .is_some()
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on a loopback port: `(status, body)`.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut last = String::new();
    for _ in 0..20 {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
                let mut buf = String::new();
                if s.read_to_string(&mut buf).is_ok() && !buf.is_empty() {
                    let status = buf
                        .split_whitespace()
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
                    return (status, body);
                }
                last = "empty answer".into();
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("nothing answers on 127.0.0.1:{port}{path}: {last}");
}

/// Test settings: short timeouts.
pub fn settings() -> ContainersConfig {
    ContainersConfig {
        health_timeout: HumanDuration(Duration::from_secs(40)),
        health_grace: HumanDuration(Duration::from_secs(1)),
        ..ContainersConfig::default()
    }
}

/// A fixture app: a project name, a port, and release directories under one temp dir.
pub struct App {
    pub project: String,
    pub port: u16,
    pub root: tempfile::TempDir,
}

/// What a release of the fixture app contains.
#[derive(Clone)]
pub struct Variant {
    pub version: String,
    /// Extra Dockerfile lines inserted after the version COPY (e.g. a failing RUN).
    pub extra_dockerfile: String,
    /// Healthcheck path (a wrong one makes the release unhealthy).
    pub health_path: String,
    /// Extra service keys (raw YAML lines, indented for the backend service).
    pub extra_service_yaml: String,
    /// Whether to add the frontend service.
    pub frontend: bool,
    /// Build the backend from a three-stage Dockerfile (`deps`, `build`, runtime) instead.
    pub multistage: bool,
    /// The dependency manifest the multi-stage `deps` stage installs (served at `/deps`).
    pub deps: String,
    /// Build the backend from a two-stage Dockerfile in BuildKit syntax instead:
    /// `FROM --platform=$BUILDPLATFORM ... AS build`, `RUN --mount=type=cache` and `type=bind`,
    /// `COPY --from=build`.
    pub buildkit_syntax: bool,
}

impl Variant {
    pub fn new(version: &str) -> Variant {
        Variant {
            version: version.into(),
            extra_dockerfile: String::new(),
            health_path: "/version".into(),
            extra_service_yaml: String::new(),
            frontend: false,
            multistage: false,
            deps: "left-pad@1.3.0".into(),
            buildkit_syntax: false,
        }
    }
}

impl App {
    pub fn new(name: &str) -> App {
        let project = format!("dtest-{name}-{}", std::process::id());
        App {
            project,
            port: free_port(),
            root: tempfile::tempdir().unwrap(),
        }
    }

    pub fn image_repo(&self, service: &str) -> String {
        format!("{}-{service}", self.project)
    }

    /// Write release `id` and return its directory.
    pub fn release(&self, id: &str, v: &Variant) -> PathBuf {
        let dir = self.root.path().join(id);
        std::fs::create_dir_all(dir.join("static")).unwrap();
        std::fs::create_dir_all(dir.join("app")).unwrap();
        std::fs::write(dir.join("static/index.html"), "<h1>static</h1>\n").unwrap();
        std::fs::write(dir.join("app/version"), format!("{}\n", v.version)).unwrap();
        std::fs::write(dir.join("kept.txt"), "kept\n").unwrap();
        std::fs::write(dir.join("secret.txt"), "do not ship\n").unwrap();
        std::fs::write(dir.join("debug.log"), "log\n").unwrap();
        std::fs::write(dir.join(".dockerignore"), "secret.txt\n*.log\n").unwrap();
        std::fs::write(dir.join(".env"), "APP_ENV=staging\nGREETING=from-dotenv\n").unwrap();
        let dockerfile = format!(
            "FROM {BASE_IMAGE}\n\
             RUN mkdir -p /www && echo base > /www/base.txt\n\
             RUN echo deps > /deps.txt && sleep 0.2\n\
             COPY static/ /www/static/\n\
             ARG APP_ENV=dev\n\
             RUN echo \"$APP_ENV\" > /www/env\n\
             COPY kept.txt /www/ctx/\n\
             COPY . /www/ctx/\n\
             COPY app/version /www/version\n\
             {extra}\
             ARG GIT_COMMIT_HASH=unknown\n\
             RUN echo \"$GIT_COMMIT_HASH\" > /www/commit\n\
             CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
            extra = v.extra_dockerfile
        );
        let dockerfile = if v.multistage {
            std::fs::write(dir.join("deps.txt"), format!("{}\n", v.deps)).unwrap();
            format!(
                "FROM {BASE_IMAGE} AS deps\n\
                 RUN mkdir -p /deps && echo toolchain > /deps/toolchain && sleep 0.2\n\
                 COPY deps.txt /deps/\n\
                 RUN cat /deps/deps.txt > /deps/installed && sleep 0.2\n\
                 FROM deps AS build\n\
                 COPY app/ /src/\n\
                 RUN cat /src/version > /app.bin\n\
                 FROM {BASE_IMAGE}\n\
                 RUN mkdir -p /www && echo base > /www/base.txt\n\
                 COPY static/ /www/static/\n\
                 COPY --from=deps /deps/installed /www/deps\n\
                 COPY --from=build /app.bin /www/version\n\
                 {extra}\
                 ARG GIT_COMMIT_HASH=unknown\n\
                 RUN echo \"$GIT_COMMIT_HASH\" > /www/commit\n\
                 CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                extra = v.extra_dockerfile
            )
        } else if v.buildkit_syntax {
            std::fs::write(dir.join("deps.txt"), format!("{}\n", v.deps)).unwrap();
            format!(
                "FROM --platform=$BUILDPLATFORM {BASE_IMAGE} AS build\n\
                 ARG TARGETPLATFORM\n\
                 RUN --mount=type=cache,target=/cache echo \"$TARGETPLATFORM\" > /platform && touch /cache/seen\n\
                 COPY deps.txt /deps/\n\
                 RUN --mount=type=cache,target=/cache --mount=type=bind,source=deps.txt,target=/mnt/deps.txt \
                     cat /mnt/deps.txt > /installed && ls /cache > /cache-seen\n\
                 COPY app/ /src/\n\
                 RUN cat /src/version > /app.bin\n\
                 FROM {BASE_IMAGE}\n\
                 RUN mkdir -p /www && echo base > /www/base.txt\n\
                 COPY static/ /www/static/\n\
                 COPY --from=build /installed /www/deps\n\
                 COPY --from=build /platform /cache-seen /www/\n\
                 COPY --from=build /app.bin /www/version\n\
                 {extra}\
                 ARG GIT_COMMIT_HASH=unknown\n\
                 RUN echo \"$GIT_COMMIT_HASH\" > /www/commit\n\
                 CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                extra = v.extra_dockerfile
            )
        } else {
            dockerfile
        };
        std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
        let mut compose = format!(
            r#"version: "3.8"
services:
  backend:
    build:
      context: .
      dockerfile: Dockerfile
      args:
        APP_ENV: ${{APP_ENV:-production}}
      cache_from:
        - {repo}:latest
    image: {repo}:latest
    ports:
      - "127.0.0.1:${{HOST_PORT}}:8080"
    environment:
      GREETING: ${{GREETING-hello}}
      LITERAL: "$$HOME"
    healthcheck:
      test: ["CMD-SHELL", "wget -q -O- http://127.0.0.1:8080{health}"]
      interval: 1s
      timeout: 2s
      retries: 2
    restart: unless-stopped
{extra}"#,
            repo = self.image_repo("backend"),
            health = v.health_path,
            extra = v.extra_service_yaml,
        );
        if v.frontend {
            std::fs::create_dir_all(dir.join("frontend")).unwrap();
            std::fs::write(
                dir.join("frontend/Dockerfile"),
                format!(
                    "FROM {BASE_IMAGE}\nRUN mkdir -p /www\nCOPY index.html /www/index.html\nCMD [\"httpd\", \"-f\", \"-p\", \"3000\", \"-h\", \"/www\"]\n"
                ),
            )
            .unwrap();
            std::fs::write(
                dir.join("frontend/index.html"),
                format!("front {}\n", v.version),
            )
            .unwrap();
            compose.push_str(&format!(
                r#"  frontend:
    build:
      context: ./frontend
    image: {repo}:latest
    depends_on:
      backend:
        condition: service_healthy
"#,
                repo = self.image_repo("frontend"),
            ));
        }
        std::fs::write(dir.join("docker-compose.yml"), compose).unwrap();
        dir
    }

    /// The environment-file variables passed to the stage.
    pub fn env(&self) -> BTreeMap<String, String> {
        [("HOST_PORT".to_string(), self.port.to_string())].into()
    }

    pub fn load(&self, release: &ReleaseRef<'_>) -> Project {
        Engine::load_project(&self.project, release, &self.env(), &settings()).unwrap()
    }

    /// Write release `id` with this compose file and these files (relative path, content);
    /// returns its directory.
    pub fn write_release(&self, id: &str, compose: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.root.path().join(id);
        std::fs::create_dir_all(&dir).unwrap();
        for (path, content) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        std::fs::write(dir.join("docker-compose.yml"), compose).unwrap();
        dir
    }

    /// The container name of a service.
    pub fn container(&self, service: &str) -> String {
        format!("{}-{service}-1", self.project)
    }

    /// `docker inspect -f FORMAT` of a service's container, trimmed.
    pub fn inspect(&self, service: &str, format: &str) -> String {
        sh(&format!(
            "docker inspect -f '{format}' {}",
            self.container(service)
        ))
        .trim()
        .to_string()
    }

    /// Run a shell command in a service's container: `(exit code, stdout and stderr)`.
    pub fn exec(&self, service: &str, cmd: &str) -> (i32, String) {
        let out = Command::new("docker")
            .args(["exec", &self.container(service), "sh", "-c", cmd])
            .output()
            .expect("spawn docker exec");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// Container ids of the project.
    pub fn containers(&self) -> Vec<String> {
        sh(&format!(
            "docker ps -aq --filter label=com.docker.compose.project={}",
            self.project
        ))
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// Tags in the project's image repositories (stage images carry no labels).
    pub fn image_tags(&self) -> Vec<String> {
        sh(&format!(
            "docker images --format '{{{{.Repository}}}}:{{{{.Tag}}}}' --filter 'reference={}-*:*'",
            self.project
        ))
        .lines()
        .map(str::to_string)
        .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let p = &self.project;
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker rm -f -v $(docker ps -aq --filter label=com.docker.compose.project={p}) ; \
                 docker rmi -f $(docker images -q --filter label=deployd.project={p} | sort -u) ; \
                 docker rmi -f $(docker images -q --filter 'reference={p}-*:*' | sort -u) ; \
                 docker network rm {p}_default $(docker network ls -q --filter label=com.docker.compose.project={p}) ; \
                 docker volume rm $(docker volume ls -q --filter label=com.docker.compose.project={p}) ; true"
            ))
            .output();
    }
}

/// What building then starting a release gave.
pub type Deployed = Result<
    (
        deployd::containers::BuildReport,
        deployd::containers::UpReport,
    ),
    deployd::containers::ContainerError,
>;

/// A unix socket relaying every connection to the engine's socket: a way to take the engine
/// away from a connected [`Engine`] (drop it, and connections to its path fail).
pub struct EngineRelay {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl EngineRelay {
    pub fn start() -> EngineRelay {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        });
        EngineRelay {
            socket,
            _dir: dir,
            task,
        }
    }
}

impl Drop for EngineRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Build then start a release, as the agent does.
pub async fn deploy(
    engine: &Engine,
    app: &App,
    release: &ReleaseRef<'_>,
    previous: Option<&ReleaseRef<'_>>,
) -> Deployed {
    deploy_with(engine, app, release, previous, &settings()).await
}

/// [`deploy`] with other settings.
pub async fn deploy_with(
    engine: &Engine,
    app: &App,
    release: &ReleaseRef<'_>,
    previous: Option<&ReleaseRef<'_>>,
    s: &ContainersConfig,
) -> Deployed {
    let project = Engine::load_project(&app.project, release, &app.env(), s)?;
    let built = engine.build(&project, release, previous, false).await?;
    let prev_project = previous.map(|p| app.load(p));
    let up = engine
        .up(&project, release, prev_project.as_ref().zip(previous), s)
        .await?;
    Ok((built, up))
}
