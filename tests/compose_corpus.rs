//! Validation of a corpus of compose projects shaped like the public sample apps teams copy
//! (`tests/compose_corpus/<nn-name>/`): each is loaded as a release would be, with no engine,
//! and must give the outcome its `expect.txt` names: `pass`, or `refused <service> <key>
//! <security|unsupported>`. The second line lists the compose forms the project uses; together
//! they cover every form deployd supports.

// A test panics to report a failure: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use deployd::config::ContainersConfig;
use deployd::containers::{
    ContainerError, DependCondition, Engine, MountSpec, Project, ReleaseRef,
};

/// The forms the corpus must use, each in at least one project that passes.
const FORMS: &[&str] = &[
    "expose",
    "container_name",
    "secrets",
    "anonymous volumes",
    "stop_signal",
    "user",
    "hostname",
    "platform",
    "deploy resources",
    "tty",
    "stdin_open",
    "x- extensions with merge keys",
    "port ranges",
    "env_file long form",
    "depends_on service_completed_successfully",
    "healthcheck.start_interval",
    "network aliases",
    "working_dir",
    "init",
    "logging",
    "extra_hosts",
    "tmpfs",
    "ulimits",
    "mem_limit",
    "cpus",
    "stop_grace_period",
    "profiles",
    "configs",
    "include",
];

fn corpus() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compose_corpus");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn load(dir: &Path, settings: &ContainersConfig) -> Result<Project, ContainerError> {
    let release = ReleaseRef {
        id: "r1",
        dir,
        commit: None,
    };
    Engine::load_project("corpus", &release, &BTreeMap::new(), settings)
}

/// `pass`, or `refused <service> <key> <kind>`, as `expect.txt` spells it.
fn outcome(result: &Result<Project, ContainerError>) -> String {
    match result {
        Ok(_) => "pass".into(),
        Err(ContainerError::Forbidden { service, key, .. }) => {
            format!("refused {service} {key} security")
        }
        Err(ContainerError::UnsupportedKey { service, key, .. }) => {
            format!("refused {service} {key} unsupported")
        }
        Err(other) => format!("error: {other}"),
    }
}

#[test]
fn the_corpus_passes_as_expected_and_covers_every_form() {
    let settings = ContainersConfig::default();
    let mut passed = 0;
    let mut covered = BTreeSet::new();
    let mut report = Vec::new();
    let dirs = corpus();
    assert_eq!(dirs.len(), 39, "the corpus has 39 projects");
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let expect = std::fs::read_to_string(dir.join("expect.txt")).unwrap();
        let mut lines = expect.lines();
        let want = lines.next().unwrap().trim().to_string();
        let forms: Vec<String> = lines
            .next()
            .and_then(|l| l.strip_prefix("forms:"))
            .unwrap_or_default()
            .split(',')
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
            .collect();
        let result = load(dir, &settings);
        let got = outcome(&result);
        if let Err(e) = &result {
            // Every refusal is one sentence naming the file, the service and the key.
            let msg = e.to_string();
            assert!(
                msg.contains("docker-compose.yml") && !msg.contains('\n'),
                "{msg}"
            );
        }
        assert_eq!(got, want, "{name}: {result:?}");
        if got == "pass" {
            passed += 1;
            covered.extend(forms.iter().cloned());
        }
        report.push(format!("{name:<36} {got:<55} {}", forms.join(", ")));
    }
    eprintln!("{}", report.join("\n"));
    eprintln!("{passed} of {} corpus projects pass validation", dirs.len());
    let missing: Vec<&&str> = FORMS.iter().filter(|f| !covered.contains(**f)).collect();
    assert!(
        missing.is_empty(),
        "forms no passing project uses: {missing:?}"
    );
    assert!(passed >= 31, "{passed} of 39 pass");
}

#[test]
fn parsed_corpus_projects_say_what_the_files_say() {
    let settings = ContainersConfig::default();
    let dir = |n: &str| corpus().into_iter().find(|d| d.ends_with(n)).unwrap();

    // include: services of included files, their relative paths against their own directory;
    // profiles: services of inactive profiles left out.
    let p = load(&dir("21-node-include-profiles"), &settings).unwrap();
    let names: Vec<&str> = p.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["postgres", "api"], "start order");
    assert_eq!(p.inactive, ["adminer", "otel"]);
    let pg = &p.services[0];
    assert!(
        pg.volumes
            .iter()
            .any(|m| matches!(m, MountSpec::Bind { source, .. }
        if source.ends_with("db/init.sql")))
    );
    let debug = ContainersConfig {
        profiles: vec!["debug".into()],
        ..ContainersConfig::default()
    };
    let p = load(&dir("21-node-include-profiles"), &debug).unwrap();
    assert!(p.services.iter().any(|s| s.name == "adminer"));

    // Port ranges expand per container port; a host range for one port stays a range.
    let p = load(&dir("28-mailpit-ports"), &settings).unwrap();
    let app = p.services.iter().find(|s| s.name == "app").unwrap();
    let published: Vec<(Option<u16>, u16)> =
        app.ports.iter().map(|p| (p.published, p.target)).collect();
    assert_eq!(
        published,
        [
            (Some(3000), 3000),
            (Some(3001), 3001),
            (Some(3002), 3002),
            (None, 9229)
        ]
    );
    assert!(p.inactive.contains(&"mailpit".to_string()));

    // Merge keys: the defaults reach every service, explicit keys win.
    let p = load(&dir("37-sentry-lite"), &settings).unwrap();
    let memcached = p.services.iter().find(|s| s.name == "memcached").unwrap();
    let logging = memcached.run.logging.as_ref().unwrap();
    assert_eq!(logging.driver.as_deref(), Some("json-file"));
    assert_eq!(logging.options["max-size"], "1m");
    let p = load(&dir("23-flask-celery-redis"), &settings).unwrap();
    let worker = p.services.iter().find(|s| s.name == "worker").unwrap();
    assert_eq!(worker.restart.as_deref(), Some("unless-stopped"));
    assert!(worker.run.read_only);
    // A built image named outside the app is tagged under the app's own repository.
    assert_eq!(worker.image, "corpus-worker:latest");

    // A migration job, and the optional dependency on a service of an inactive profile.
    let p = load(&dir("24-laravel-mysql-migrate"), &settings).unwrap();
    assert!(p.is_job("migrate"));
    let app = p.services.iter().find(|s| s.name == "app").unwrap();
    assert!(
        app.depends_on
            .iter()
            .any(|d| d.condition == DependCondition::CompletedSuccessfully)
    );
    let p = load(&dir("35-mongo-express"), &settings).unwrap();
    let me = p
        .services
        .iter()
        .find(|s| s.name == "mongo-express")
        .unwrap();
    assert_eq!(me.depends_on.len(), 1, "{:?}", me.depends_on);
    assert!(me.depends_on[0].restart);

    // container_name is an alias on the service's networks.
    let p = load(&dir("05-django-postgres"), &settings).unwrap();
    let web = p.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.networks[0].aliases, ["django_web"]);

    // The shared proxy network passes once the operator allows it.
    let allowed = ContainersConfig {
        allowed_external: vec!["proxy".into()],
        ..ContainersConfig::default()
    };
    let p = load(&dir("36-external-proxy-network"), &allowed).unwrap();
    let net = p.networks.iter().find(|n| n.key == "default").unwrap();
    assert!(net.external && net.allowed_external && net.engine_name == "proxy");
}
