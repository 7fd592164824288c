//! The deployment files are checked as far as this machine can: every YAML parses, the
//! Compose file and the Kubernetes manifests have what operators rely on (probes,
//! healthchecks, disruption budgets, autoscaling), every metric the alerts and the dashboard
//! use exists, and the alert rules pass `promtool check rules`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
        })
        .collect()
}

/// Metric names the code registers (`paystream_*` string literals in telemetry.rs).
fn registered_metrics() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(root().join("processors/src/telemetry.rs")).expect("telemetry.rs");
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("paystream_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

/// `paystream_*` names used in `text`, without histogram suffixes.
fn metrics_used(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("paystream_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        used.insert(base.to_owned());
    }
    used
}

#[test]
fn every_deployment_yaml_parses_and_the_dashboard_is_json() {
    let mut files = Vec::new();
    files_under(&root().join("deploy"), &mut files);
    let yaml: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    assert!(yaml.len() >= 10, "{yaml:?}");
    for path in yaml
        .iter()
        .copied()
        .chain([&root().join("docker-compose.yml")])
    {
        assert!(!yaml_docs(path).is_empty(), "{} is empty", path.display());
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/paystream.json"))
            .expect("read"),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| p.len() >= 10));
}

#[test]
fn alerts_dashboard_and_autoscaling_use_only_metrics_that_exist() {
    let registered = registered_metrics();
    assert!(
        registered.contains("paystream_consumer_lag_messages"),
        "{registered:?}"
    );
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/dashboards/paystream.json",
        "deploy/k8s/account-processor.yaml",
        "deploy/k8s/order-processor.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).expect("read");
        let used = metrics_used(&text);
        assert!(!used.is_empty(), "{file} uses no metric");
        let unknown: Vec<&String> = used.difference(&registered).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the code does not export: {unknown:?}"
        );
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
        .expect("promtool is installed by scripts/test.sh");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_runs_every_role_with_healthchecks_and_prometheus_scrapes_them() {
    let compose = &yaml_docs(&root().join("docker-compose.yml"))[0];
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "postgres",
        "kafka",
        "setup",
        "api",
        "account-processor",
        "order-processor",
        "relay",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    for name in [
        "postgres",
        "kafka",
        "api",
        "account-processor",
        "order-processor",
        "relay",
        "prometheus",
        "grafana",
    ] {
        assert!(
            !compose["services"][name]["healthcheck"].is_null(),
            "{name} has no healthcheck (docker compose up --wait needs one)"
        );
    }
    assert_eq!(
        compose["services"]["account-processor"]["deploy"]["replicas"],
        2
    );
    assert!(compose["services"]["kafka"]["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("apache/kafka")));
    let prometheus = &yaml_docs(&root().join("deploy/prometheus/prometheus.yml"))[0];
    let text = serde_yaml::to_string(prometheus).expect("yaml");
    for target in ["api:8080", "account-processor", "order-processor", "relay"] {
        assert!(text.contains(target), "prometheus does not scrape {target}");
    }
}

#[test]
fn every_kubernetes_deployment_has_probes_a_disruption_budget_and_no_inline_secret() {
    let dir = root().join("deploy/k8s");
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    let mut kinds = BTreeSet::new();
    let mut deployments = Vec::new();
    let mut budgets = BTreeSet::new();
    let mut autoscaled = BTreeSet::new();
    for resource in kustomization["resources"].as_sequence().expect("resources") {
        for doc in yaml_docs(&dir.join(resource.as_str().expect("file name"))) {
            let kind = doc["kind"].as_str().expect("kind").to_owned();
            assert_ne!(kind, "Secret", "secrets are referenced, not committed");
            match kind.as_str() {
                "Deployment" => deployments.push(doc.clone()),
                "PodDisruptionBudget" => {
                    budgets.insert(doc["metadata"]["name"].as_str().expect("name").to_owned());
                }
                "HorizontalPodAutoscaler" => {
                    autoscaled.insert(
                        doc["spec"]["scaleTargetRef"]["name"]
                            .as_str()
                            .expect("target")
                            .to_owned(),
                    );
                }
                _ => {}
            }
            kinds.insert(kind);
        }
    }
    for kind in [
        "ConfigMap",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(kinds.contains(kind), "no {kind} in the manifests");
    }
    assert_eq!(deployments.len(), 4);
    for deployment in &deployments {
        let name = deployment["metadata"]["name"].as_str().expect("name");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{name}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{name}"
        );
        let from: Vec<&str> = container["envFrom"]
            .as_sequence()
            .expect("envFrom")
            .iter()
            .filter_map(|e| e["secretRef"]["name"].as_str())
            .collect();
        assert_eq!(from, ["paystream"], "{name} reads the secret by reference");
        assert!(budgets.contains(name), "{name} has no PodDisruptionBudget");
    }
    for processor in ["paystream-account-processor", "paystream-order-processor"] {
        assert!(
            autoscaled.contains(processor),
            "{processor} is not autoscaled on lag"
        );
    }
}
