//! The line protocol between the scenario driver and the test harness.
//!
//! The driver prints its findings as lines on its standard output, which is
//! the nested machine's console when it runs nested. Every line starts with
//! [`PREFIX`] so that the harness can pick them out of kernel messages:
//!
//! ```text
//! LINUX-TIER RESULT <scenario> PASS <detail>
//! LINUX-TIER RESULT <scenario> FAIL <reason>
//! LINUX-TIER FIGURE <name> <value> <unit>
//! LINUX-TIER LOG <scenario> | <a console or stderr line of the guest>
//! LINUX-TIER RETRY <scenario> <attempt> <reason it failed in that attempt>
//! LINUX-TIER ALIVE
//! LINUX-TIER DONE failed=<n>
//! ```
//!
//! `ALIVE` comes every [`ALIVE_EVERY`] from a thread of its own, so that
//! the harness can tell a nested machine that stopped (its kernel hung)
//! from a scenario that takes minutes.

use std::collections::BTreeMap;

/// What every protocol line starts with.
pub const PREFIX: &str = "LINUX-TIER";

/// The outcome of one scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether it passed.
    pub passed: bool,
    /// What was checked, or why it failed.
    pub detail: String,
}

/// Everything the driver reported.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Outcome per scenario name.
    pub results: BTreeMap<String, Outcome>,
    /// Figures (name → value and unit), such as boot times.
    pub figures: BTreeMap<String, String>,
    /// Guest lines the driver attached to each scenario (on failure).
    pub logs: BTreeMap<String, Vec<String>>,
    /// Scenarios that failed in an attempt of their set after which the
    /// driver ran the set again: (scenario, attempt, reason).
    pub retried: Vec<(String, u32, String)>,
    /// Whether the driver said it was done (it did not die midway).
    pub done: bool,
}

/// Prints a RESULT line.
pub fn result(scenario: &str, passed: bool, detail: &str) {
    let status = if passed { "PASS" } else { "FAIL" };
    println!("{PREFIX} RESULT {scenario} {status} {}", one_line(detail));
}

/// Prints a FIGURE line.
pub fn figure(name: &str, value: impl std::fmt::Display, unit: &str) {
    println!("{PREFIX} FIGURE {name} {value} {unit}");
}

/// Prints LOG lines for a scenario.
pub fn log(scenario: &str, lines: &[String]) {
    for l in lines {
        println!("{PREFIX} LOG {scenario} | {}", one_line(l));
    }
}

/// Prints a RETRY line: `scenario` failed in `attempt` of its set, which
/// runs again.
pub fn retry(scenario: &str, attempt: usize, reason: &str) {
    println!("{PREFIX} RETRY {scenario} {attempt} {}", one_line(reason));
}

/// How often the driver says it is alive.
pub const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// Prints an ALIVE line every [`ALIVE_EVERY`], from a thread of its own,
/// for the life of the process.
pub fn keep_saying_alive() {
    std::thread::spawn(|| loop {
        std::thread::sleep(ALIVE_EVERY);
        println!("{PREFIX} ALIVE");
    });
}

/// Prints the DONE line.
pub fn done(failed: usize) {
    println!("{PREFIX} DONE failed={failed}");
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " / ")
}

impl Report {
    /// Takes in a later run's report: a scenario keeps an outcome that
    /// passed; otherwise the later outcome (and its log) replaces it.
    pub fn merge(&mut self, later: Report) {
        for (name, outcome) in later.results {
            let keep = self.results.get(&name).is_some_and(|o| o.passed);
            if !keep {
                match later.logs.get(&name) {
                    Some(log) => {
                        self.logs.insert(name.clone(), log.clone());
                    }
                    None => {
                        self.logs.remove(&name);
                    }
                }
                self.results.insert(name, outcome);
            }
        }
        self.figures.extend(later.figures);
        self.retried.extend(later.retried);
        self.done = later.done;
    }

    /// Why `scenario` did not pass in this report, with the log lines the
    /// driver attached (bounded by the driver), so that a CI log alone
    /// explains a failure. None if it passed.
    pub fn failure(&self, scenario: &str) -> Option<String> {
        let outcome = match self.results.get(scenario) {
            Some(o) if o.passed => return None,
            Some(o) => format!("FAIL {}", o.detail),
            None if self.done => "no result (the driver finished without reporting it)".into(),
            None => "no result (the driver did not finish)".into(),
        };
        let mut text = format!("{scenario}: {outcome}");
        for line in self.logs.get(scenario).into_iter().flatten() {
            text.push_str("\n    | ");
            text.push_str(line);
        }
        Some(text)
    }

    /// Collects the protocol lines out of a console transcript. Text before
    /// the prefix on the same line (a kernel message that was cut into) is
    /// ignored.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Report {
        let mut r = Report::default();
        for line in lines {
            let Some(at) = line.find(PREFIX) else {
                continue;
            };
            let rest = line[at + PREFIX.len()..].trim_start();
            let mut words = rest.splitn(2, ' ');
            let kind = words.next().unwrap_or_default();
            let body = words.next().unwrap_or_default();
            match kind {
                "RESULT" => {
                    let mut w = body.splitn(3, ' ');
                    let name = w.next().unwrap_or_default().to_string();
                    let passed = w.next() == Some("PASS");
                    let detail = w.next().unwrap_or_default().to_string();
                    // A pass stands: a set's retry runs its scenarios that
                    // passed the first time again.
                    if !r.results.get(&name).is_some_and(|o| o.passed) {
                        r.results.insert(name, Outcome { passed, detail });
                    }
                }
                "FIGURE" => {
                    let mut w = body.splitn(2, ' ');
                    let name = w.next().unwrap_or_default().to_string();
                    r.figures
                        .insert(name, w.next().unwrap_or_default().to_string());
                }
                "LOG" => {
                    let (name, text) = body.split_once(" | ").unwrap_or((body, ""));
                    r.logs
                        .entry(name.to_string())
                        .or_default()
                        .push(text.to_string());
                }
                "RETRY" => {
                    let mut w = body.splitn(3, ' ');
                    let name = w.next().unwrap_or_default().to_string();
                    let attempt = w.next().and_then(|a| a.parse().ok()).unwrap_or(0);
                    let reason = w.next().unwrap_or_default().to_string();
                    r.retried.push((name, attempt, reason));
                }
                "DONE" => r.done = true,
                _ => {}
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_results_figures_and_logs() {
        let text = [
            "[    1.0] some kernel line",
            "LINUX-TIER RESULT boot-2vcpus PASS 2 cpus, 12 heartbeats",
            "noiseLINUX-TIER RESULT save-stream FAIL no heartbeat after restore",
            "LINUX-TIER FIGURE boot_to_init_ms 4100 ms",
            "LINUX-TIER LOG save-stream | HB seq=3 mono_ns=1",
            "LINUX-TIER DONE failed=1",
        ];
        let r = Report::parse(text);
        assert!(r.done);
        assert!(r.results["boot-2vcpus"].passed);
        assert_eq!(r.results["boot-2vcpus"].detail, "2 cpus, 12 heartbeats");
        assert!(!r.results["save-stream"].passed);
        assert_eq!(r.figures["boot_to_init_ms"], "4100 ms");
        assert_eq!(r.logs["save-stream"], vec!["HB seq=3 mono_ns=1"]);
    }

    #[test]
    fn a_pass_in_any_run_stands() {
        let mut first = Report::parse([
            "LINUX-TIER RESULT a PASS fine",
            "LINUX-TIER RESULT b FAIL triple fault",
            "LINUX-TIER LOG b | boom",
        ]);
        let second = Report::parse([
            "LINUX-TIER RESULT a FAIL stalled",
            "LINUX-TIER RESULT b PASS fine",
            "LINUX-TIER DONE failed=1",
        ]);
        let why = first.failure("b").unwrap();
        assert_eq!(why, "b: FAIL triple fault\n    | boom");
        assert_eq!(second.failure("a").unwrap(), "a: FAIL stalled");
        assert!(second.failure("b").is_none());
        assert_eq!(
            second.failure("c").unwrap(),
            "c: no result (the driver finished without reporting it)"
        );
        first.merge(second);
        assert!(first.results["a"].passed && first.results["b"].passed);
        assert!(!first.logs.contains_key("b"));
        assert!(first.done);
    }

    #[test]
    fn a_set_retry_is_recorded_and_a_pass_in_either_attempt_stands() {
        let r = Report::parse([
            "LINUX-TIER RESULT a PASS fine",
            "LINUX-TIER RESULT b FAIL no heartbeat for 60 s",
            "LINUX-TIER LOG b | stalled",
            "LINUX-TIER RETRY b 1 no heartbeat for 60 s",
            "LINUX-TIER RESULT a FAIL the guest did not boot",
            "LINUX-TIER RESULT b PASS fine",
            "LINUX-TIER DONE failed=0",
        ]);
        assert!(r.failure("a").is_none() && r.failure("b").is_none());
        assert_eq!(
            r.retried,
            vec![("b".to_string(), 1, "no heartbeat for 60 s".to_string())]
        );
        assert_eq!(r.logs["b"], vec!["stalled"]);
    }
}
