//! The compile step: a `LoadTest` scenario turned into something a million users can
//! walk without parsing anything again.
//!
//! Every template, JSONPath and CEL expression is parsed here and every state name is
//! resolved to an index, so a broken scenario is refused before the first request,
//! with an error that names the state and field (`scenario.states[browse].checks[1]:
//! CEL syntax error at column 7: …`).

use std::collections::HashMap;

use rand::Rng;
use trimtab_api::load_test::{Invariant, Scenario};

use super::{
    check::{CelSyntaxError, Check},
    extract::{ExtractError, Extractor},
    request::{CompiledRequest, RequestError, Templates},
    think::{Think, ThinkTimeError},
};

/// A scenario (or invariant) that cannot run, and where.
#[derive(Debug, thiserror::Error)]
#[error("{at}: {problem}")]
pub struct CompileError {
    /// The field, spelled as in the YAML: `scenario.states[browse].checks[1]`.
    pub at: String,
    /// What is wrong with it.
    pub problem: Problem,
}

/// What is wrong with a scenario field.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// A request template.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// An `extract` entry.
    #[error(transparent)]
    Extract(#[from] ExtractError),
    /// A check or `expect`.
    #[error(transparent)]
    Cel(#[from] CelSyntaxError),
    /// A think time.
    #[error(transparent)]
    ThinkTime(#[from] ThinkTimeError),
    /// `start` or `next[].state` names no state.
    #[error("unknown state {name:?}; the states are {known}")]
    UnknownState {
        /// The name given.
        name: String,
        /// The names there are.
        known: String,
    },
    /// Two states share a name.
    #[error("duplicate state name {name:?}: state names must be unique")]
    DuplicateState {
        /// The repeated name.
        name: String,
    },
    /// Every transition of a state weighs 0, so no next state could ever be chosen.
    #[error("every transition weighs 0: expected at least one weight above 0")]
    ZeroWeights,
    /// `next: []`.
    #[error("empty list: omit next to end the session here, or name at least one state")]
    NoTransitions,
    /// No states at all.
    #[error("no states: expected at least one")]
    NoStates,
}

/// A state's weighted transitions as a cumulative table, for O(log n) choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transitions {
    /// Target state indexes.
    targets: Vec<usize>,
    /// Running sums of the weights; the last one is the total (> 0).
    cumulative: Vec<u64>,
}

impl Transitions {
    /// Builds the table; `None` when every weight is 0.
    pub fn new(weighted: &[(usize, u32)]) -> Option<Self> {
        let mut total = 0u64;
        let mut targets = Vec::with_capacity(weighted.len());
        let mut cumulative = Vec::with_capacity(weighted.len());
        for &(target, weight) in weighted {
            if weight == 0 {
                continue;
            }
            total += u64::from(weight);
            targets.push(target);
            cumulative.push(total);
        }
        (total > 0).then_some(Self {
            targets,
            cumulative,
        })
    }

    /// Picks the next state with probability weight ÷ total.
    pub fn choose<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1);
        let ticket = rng.random_range(0..total);
        // The first running sum above the ticket; always in range since ticket < total.
        let slot = self.cumulative.partition_point(|&c| c <= ticket);
        self.targets[slot.min(self.targets.len() - 1)]
    }
}

/// One compiled state.
#[derive(Debug)]
pub struct CompiledState {
    /// The state's name.
    pub name: String,
    /// The request, if the state sends one.
    pub request: Option<CompiledRequest>,
    /// Variables to extract, in name order.
    pub extract: Vec<(std::sync::Arc<str>, Extractor)>,
    /// Checks that must hold.
    pub checks: Vec<Check>,
    /// Where to go next; `None` ends the session.
    pub next: Option<Transitions>,
    /// This state's think time, or the scenario default.
    pub think: Think,
    /// Whether the response body must be parsed as JSON.
    pub needs_json: bool,
}

/// A compiled scenario, shared by every user behind an `Arc`.
#[derive(Debug)]
pub struct CompiledScenario {
    /// The states, in spec order.
    pub states: Vec<CompiledState>,
    /// The index of the start state.
    pub start: usize,
    /// All templates.
    pub templates: Templates,
}

/// A compiled invariant.
#[derive(Debug)]
pub struct CompiledInvariant {
    /// The invariant's name.
    pub name: String,
    /// The request that reads the state to check.
    pub request: CompiledRequest,
    /// The expectation.
    pub expect: Check,
    /// How often to check.
    pub every: std::time::Duration,
}

impl CompiledScenario {
    /// Compiles a scenario and the invariants that share its templates.
    pub fn compile(
        scenario: &Scenario,
        invariants: &[Invariant],
    ) -> Result<(Self, Vec<CompiledInvariant>), CompileError> {
        let mut templates = Templates::default();
        let at = |field: String| move |problem: Problem| CompileError { at: field, problem };
        if scenario.states.is_empty() {
            return Err(at("scenario.states".into())(Problem::NoStates));
        }
        let mut index = HashMap::new();
        for state in &scenario.states {
            if index.insert(state.name.as_str(), index.len()).is_some() {
                return Err(at(format!("scenario.states[{}].name", state.name))(
                    Problem::DuplicateState {
                        name: state.name.clone(),
                    },
                ));
            }
        }
        let known = scenario
            .states
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let resolve = |name: &str, field: String| {
            index.get(name).copied().ok_or_else(|| {
                at(field)(Problem::UnknownState {
                    name: name.to_owned(),
                    known: known.clone(),
                })
            })
        };
        let start = resolve(&scenario.start, "scenario.start".into())?;
        let default_think = match &scenario.think_time {
            Some(spec) => {
                Think::compile(spec).map_err(|e| at("scenario.thinkTime".into())(e.into()))?
            }
            None => Think::ZERO,
        };
        let common_headers: Vec<(String, String)> = scenario
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        let mut states = Vec::with_capacity(scenario.states.len());
        for state in &scenario.states {
            let base = format!("scenario.states[{}]", state.name);
            let request = match &state.request {
                Some(spec) => Some(
                    CompiledRequest::compile(&mut templates, spec, &common_headers).map_err(
                        // The request error names its own field (`path`, `json.product`).
                        |e| at(format!("{base}.request"))(e.into()),
                    )?,
                ),
                None => None,
            };
            let mut extract = Vec::with_capacity(state.extract.len());
            for (name, spec) in &state.extract {
                let extractor = Extractor::compile(spec)
                    .map_err(|e| at(format!("{base}.extract.{name}"))(e.into()))?;
                extract.push((std::sync::Arc::from(name.as_str()), extractor));
            }
            let mut checks = Vec::with_capacity(state.checks.len());
            for (i, source) in state.checks.iter().enumerate() {
                checks.push(
                    Check::compile(source)
                        .map_err(|e| at(format!("{base}.checks[{i}]"))(e.into()))?,
                );
            }
            let next = match &state.next {
                None => None,
                Some(list) if list.is_empty() => {
                    return Err(at(format!("{base}.next"))(Problem::NoTransitions));
                }
                Some(list) => {
                    let mut weighted = Vec::with_capacity(list.len());
                    for (i, t) in list.iter().enumerate() {
                        weighted.push((
                            resolve(&t.state, format!("{base}.next[{i}].state"))?,
                            t.weight,
                        ));
                    }
                    Some(
                        Transitions::new(&weighted)
                            .ok_or_else(|| at(format!("{base}.next"))(Problem::ZeroWeights))?,
                    )
                }
            };
            let think = match &state.think_time {
                Some(spec) => {
                    Think::compile(spec).map_err(|e| at(format!("{base}.thinkTime"))(e.into()))?
                }
                None => default_think,
            };
            let needs_json = !checks.is_empty() || extract.iter().any(|(_, e)| e.needs_json());
            states.push(CompiledState {
                name: state.name.clone(),
                request,
                extract,
                checks,
                next,
                think,
                needs_json,
            });
        }

        let mut compiled_invariants = Vec::with_capacity(invariants.len());
        for inv in invariants {
            let base = format!("invariants[{}]", inv.name);
            let request = CompiledRequest::compile(&mut templates, &inv.request, &common_headers)
                .map_err(|e| at(format!("{base}.request"))(e.into()))?;
            let expect =
                Check::compile(&inv.expect).map_err(|e| at(format!("{base}.expect"))(e.into()))?;
            compiled_invariants.push(CompiledInvariant {
                name: inv.name.clone(),
                request,
                expect,
                every: inv.every.get(),
            });
        }
        Ok((
            Self {
                states,
                start,
                templates,
            },
            compiled_invariants,
        ))
    }

    /// The index of the state called `name`.
    pub fn state_index(&self, name: &str) -> Option<usize> {
        self.states.iter().position(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::SmallRng};
    use trimtab_api::load_test::LoadTestSpec;

    use super::*;

    const SHOP: &str = include_str!("../../../examples/shop-loadtest.yaml");

    fn shop_spec() -> LoadTestSpec {
        let doc: serde_json::Value = serde_yaml_ng::from_str(SHOP).expect("yaml");
        serde_json::from_value(doc["spec"].clone()).expect("spec")
    }

    fn compile_error(edit: impl FnOnce(&mut LoadTestSpec)) -> String {
        let mut spec = shop_spec();
        edit(&mut spec);
        CompiledScenario::compile(&spec.scenario, &spec.invariants)
            .expect_err("must be refused")
            .to_string()
    }

    fn state<'a>(spec: &'a mut LoadTestSpec, name: &str) -> &'a mut trimtab_api::load_test::State {
        spec.scenario
            .states
            .iter_mut()
            .find(|s| s.name == name)
            .expect("state exists")
    }

    #[test]
    fn the_shop_example_compiles() {
        let spec = shop_spec();
        let (scenario, invariants) =
            CompiledScenario::compile(&spec.scenario, &spec.invariants).expect("compiles");
        assert_eq!(scenario.states.len(), 5);
        assert_eq!(scenario.states[scenario.start].name, "login");
        assert!(
            scenario.states[scenario.state_index("checkout").expect("exists")]
                .next
                .is_none()
        );
        assert_eq!(invariants.len(), 1);
    }

    #[test]
    fn refuses_a_cel_syntax_error_naming_state_check_and_column() {
        let message =
            compile_error(|s| state(s, "browse").checks[1] = "size(response.json.items) 0".into());
        assert!(
            message.starts_with("scenario.states[browse].checks[1]: CEL syntax error at column 27"),
            "{message}"
        );
    }

    #[test]
    fn refuses_a_bad_template_naming_state_and_field() {
        let message = compile_error(|s| {
            state(s, "browse").request.as_mut().expect("request").path =
                "/api/products?page={{ user.id +".into()
        });
        assert!(
            message.starts_with("scenario.states[browse].request: path: template syntax error"),
            "{message}"
        );
        let message = compile_error(|s| {
            state(s, "browse")
                .request
                .as_mut()
                .expect("request")
                .headers
                .insert("authorization".into(), "Bearer {{ vars.token".into());
        });
        assert!(
            message.starts_with(
                "scenario.states[browse].request: headers.authorization: template syntax error"
            ),
            "{message}"
        );
    }

    #[test]
    fn refuses_a_bad_json_path_naming_state_and_variable() {
        let message = compile_error(|s| {
            state(s, "login")
                .extract
                .insert("token".into(), "$.token[".into());
        });
        assert!(
            message.starts_with("scenario.states[login].extract.token: JSONPath \"$.token[\""),
            "{message}"
        );
    }

    #[test]
    fn refuses_an_unknown_state_naming_the_transition() {
        let message = compile_error(|s| {
            state(s, "browse").next.as_mut().expect("next")[1].state = "addToKart".into()
        });
        assert!(
            message
                .starts_with("scenario.states[browse].next[1].state: unknown state \"addToKart\""),
            "{message}"
        );
        let message = compile_error(|s| s.scenario.start = "signin".into());
        assert!(
            message.starts_with("scenario.start: unknown state \"signin\""),
            "{message}"
        );
    }

    #[test]
    fn refuses_transitions_that_all_weigh_zero() {
        let message = compile_error(|s| {
            for t in state(s, "addToCart").next.as_mut().expect("next") {
                t.weight = 0;
            }
        });
        assert!(
            message.starts_with("scenario.states[addToCart].next: every transition weighs 0"),
            "{message}"
        );
    }

    #[test]
    fn refuses_duplicate_states_and_bad_think_times() {
        let message = compile_error(|s| {
            let copy = s.scenario.states[0].clone();
            s.scenario.states.push(copy);
        });
        assert!(
            message.starts_with("scenario.states[login].name: duplicate state"),
            "{message}"
        );
        let message = compile_error(|s| {
            s.scenario.think_time.as_mut().expect("think").mean = None;
        });
        assert!(
            message.starts_with("scenario.thinkTime: exponential think times need mean"),
            "{message}"
        );
    }

    #[test]
    fn refuses_a_bad_invariant_expectation() {
        let message =
            compile_error(|s| s.invariants[0].expect = "response.json.items.all(i,".into());
        assert!(
            message.starts_with("invariants[stock-never-negative].expect: CEL syntax error"),
            "{message}"
        );
    }

    #[test]
    fn transitions_follow_their_weights_and_skip_zero() {
        let t = Transitions::new(&[(0, 3), (1, 0), (2, 1)]).expect("some weight");
        let mut rng = SmallRng::seed_from_u64(9);
        let mut counts = [0u32; 3];
        for _ in 0..40_000 {
            counts[t.choose(&mut rng)] += 1;
        }
        assert_eq!(counts[1], 0);
        let share = f64::from(counts[0]) / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
        assert!(Transitions::new(&[(0, 0)]).is_none());
    }
}
