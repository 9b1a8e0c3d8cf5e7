//! Reload as a plan: what to keep, start and stop, worked out from the running config and
//! the new one alone, without sockets or tasks, so that each case is a unit test.
//!
//! The rules: upstreams with the same [`SourceKey`] share one token source, and a source whose
//! key is still wanted keeps running (and its token). A listener is known by its address
//! (port 0, any free port, by its upstream's name): one whose address stays keeps its socket
//! and connections, and is updated in place when its settings changed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use crate::config::{self, Config};
use crate::token::SourceKey;

/// A listener is known by its address; port 0 (any free port, as tests use) never matches
/// another, so such listeners are known by their first route's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ListenerKey {
    Addr(SocketAddr),
    AnyPort(String),
}

impl ListenerKey {
    pub(crate) fn of(listener: &config::Listener) -> Self {
        if listener.listen.port() == 0 {
            Self::AnyPort(listener.routes.first().cloned().unwrap_or_default())
        } else {
            Self::Addr(listener.listen)
        }
    }
}

/// What a running listener was built from: when these are equal, nothing about it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Serving {
    /// Its address, mode, who may connect, and its routes' names.
    pub(crate) listener: config::Listener,
    /// Its routes, in match order.
    pub(crate) routes: Vec<config::Upstream>,
    /// `[log] access`.
    pub(crate) access_log: bool,
}

impl Serving {
    fn of(listener: &config::Listener, config: &Config) -> Self {
        Self {
            listener: listener.clone(),
            routes: routes_of(config, listener).into_iter().cloned().collect(),
            access_log: config.log.access,
        }
    }

    /// Whether it serves the route `name`.
    pub(crate) fn serves(&self, name: &str) -> bool {
        self.listener.routes.iter().any(|route| route == name)
    }
}

/// The routes of `listener`, in its order.
fn routes_of<'a>(config: &'a Config, listener: &config::Listener) -> Vec<&'a config::Upstream> {
    listener
        .routes
        .iter()
        .filter_map(|name| config.upstreams.iter().find(|u| &u.name == name))
        .collect()
}

/// What happens to one token source or listener the new config has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// It runs already, as wanted.
    Keep,
    /// It runs already (same source key, same listen address); its settings change in place.
    Update,
    /// It must be started (a listener: bound).
    Start,
}

/// A token source of the new config.
#[derive(Debug)]
pub(crate) struct SourcePlan<'a> {
    pub(crate) key: SourceKey,
    /// `Keep` or `Start`: a source's settings are its key.
    pub(crate) step: Step,
    /// The upstreams it serves, in file order.
    pub(crate) users: Vec<&'a config::Upstream>,
}

/// A listener of the new config.
#[derive(Debug)]
pub(crate) struct ListenerPlan<'a> {
    pub(crate) key: ListenerKey,
    pub(crate) step: Step,
    pub(crate) listener: &'a config::Listener,
    /// Its routes, in match order.
    pub(crate) routes: Vec<&'a config::Upstream>,
    pub(crate) serving: Serving,
}

/// Everything a reload changes.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    /// The new config's token sources, in order of first use.
    pub(crate) sources: Vec<SourcePlan<'a>>,
    /// The new config's listeners, in file order.
    pub(crate) listeners: Vec<ListenerPlan<'a>>,
    /// Running sources no upstream needs any more.
    pub(crate) stop_sources: Vec<SourceKey>,
    /// Running listeners whose address the new config no longer has: they drain.
    pub(crate) stop_listeners: Vec<ListenerKey>,
    /// Upstreams that are gone, whose metric series go with them.
    pub(crate) gone: Vec<String>,
}

impl<'a> Plan<'a> {
    /// The plan from `running` (`None` at start) to `new`.
    pub(crate) fn between(running: Option<&Config>, new: &'a Config) -> Self {
        let empty = [];
        let old = running.map_or(&empty[..], |c| &c.upstreams[..]);
        let running_sources: HashSet<SourceKey> = old.iter().map(SourceKey::of).collect();
        let running_listeners: HashMap<ListenerKey, Serving> = running
            .map(|config| {
                config
                    .listeners
                    .iter()
                    .map(|l| (ListenerKey::of(l), Serving::of(l, config)))
                    .collect()
            })
            .unwrap_or_default();

        let mut sources: Vec<SourcePlan<'a>> = Vec::new();
        let mut listeners = Vec::with_capacity(new.listeners.len());
        for listener in &new.listeners {
            let key = ListenerKey::of(listener);
            let serving = Serving::of(listener, new);
            let step = match running_listeners.get(&key) {
                Some(running) if *running == serving => Step::Keep,
                Some(_) => Step::Update,
                None => Step::Start,
            };
            listeners.push(ListenerPlan {
                key,
                step,
                listener,
                routes: routes_of(new, listener),
                serving,
            });
        }
        for upstream in &new.upstreams {
            let key = SourceKey::of(upstream);
            match sources.iter_mut().find(|s| s.key == key) {
                Some(shared) => shared.users.push(upstream),
                None => sources.push(SourcePlan {
                    step: if running_sources.contains(&key) {
                        Step::Keep
                    } else {
                        Step::Start
                    },
                    key,
                    users: vec![upstream],
                }),
            }
        }

        let wanted_sources: HashSet<&SourceKey> = sources.iter().map(|s| &s.key).collect();
        let wanted_listeners: HashSet<&ListenerKey> = listeners.iter().map(|l| &l.key).collect();
        let names: HashSet<&str> = new.upstreams.iter().map(|u| u.name.as_str()).collect();
        let mut stop_sources = Vec::new();
        for upstream in old {
            let key = SourceKey::of(upstream);
            if !wanted_sources.contains(&key) && !stop_sources.contains(&key) {
                stop_sources.push(key);
            }
        }
        Plan {
            stop_listeners: running_listeners
                .keys()
                .filter(|key| !wanted_listeners.contains(key))
                .cloned()
                .collect(),
            gone: old
                .iter()
                .filter(|u| !names.contains(u.name.as_str()))
                .map(|u| u.name.clone())
                .collect(),
            sources,
            listeners,
            stop_sources,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A config of upstreams given as (name, listen, token url, scope).
    fn config(upstreams: &[(&str, &str, &str, &str)], access_log: bool) -> Config {
        let mut text = format!("[log]\naccess = {access_log}\n");
        for (name, listen, token_url, scope) in upstreams {
            text.push_str(&format!(
                "[[upstream]]\nname = \"{name}\"\nlisten = \"{listen}\"\nurl = \"https://api.example.com\"\n\
                 [upstream.token]\nurl = \"{token_url}\"\nclient_id = \"app\"\nclient_secret = \"s\"\nscope = \"{scope}\"\n"
            ));
        }
        Config::parse(Path::new("/etc/bearerd.toml"), &text).unwrap()
    }

    const AUTH: &str = "https://auth.example.com/token";
    const OTHER_AUTH: &str = "https://other.example.com/token";

    fn steps(plan: &Plan<'_>) -> (Vec<Step>, Vec<Step>) {
        (
            plan.sources.iter().map(|s| s.step).collect(),
            plan.listeners.iter().map(|l| l.step).collect(),
        )
    }

    #[test]
    fn at_start_everything_starts_and_equal_token_settings_share_a_source() {
        let new = config(
            &[
                ("a", "127.0.0.1:8081", AUTH, "read"),
                ("b", "127.0.0.1:8082", AUTH, "read"),
                ("c", "127.0.0.1:8083", AUTH, "write"),
            ],
            false,
        );
        let plan = Plan::between(None, &new);
        assert_eq!(steps(&plan), (vec![Step::Start; 2], vec![Step::Start; 3]));
        let users: Vec<Vec<&str>> = plan
            .sources
            .iter()
            .map(|s| s.users.iter().map(|u| u.name.as_str()).collect())
            .collect();
        assert_eq!(users, [vec!["a", "b"], vec!["c"]]);
        assert!(plan.stop_sources.is_empty() && plan.stop_listeners.is_empty());
        assert!(plan.gone.is_empty());
    }

    #[test]
    fn the_same_config_keeps_everything() {
        let old = config(&[("a", "127.0.0.1:8081", AUTH, "read")], false);
        let new = config(&[("a", "127.0.0.1:8081", AUTH, "read")], false);
        let plan = Plan::between(Some(&old), &new);
        assert_eq!(steps(&plan), (vec![Step::Keep], vec![Step::Keep]));
        assert!(plan.stop_sources.is_empty() && plan.stop_listeners.is_empty());
    }

    #[test]
    fn new_token_settings_start_a_source_stop_the_old_and_update_the_listener() {
        let old = config(&[("a", "127.0.0.1:8081", AUTH, "read")], false);
        let new = config(&[("a", "127.0.0.1:8081", OTHER_AUTH, "read")], false);
        let plan = Plan::between(Some(&old), &new);
        assert_eq!(steps(&plan), (vec![Step::Start], vec![Step::Update]));
        assert_eq!(plan.stop_sources, [SourceKey::of(&old.upstreams[0])]);
        assert!(plan.stop_listeners.is_empty() && plan.gone.is_empty());
    }

    #[test]
    fn a_source_still_used_by_another_upstream_keeps_running() {
        let old = config(
            &[
                ("a", "127.0.0.1:8081", AUTH, "read"),
                ("b", "127.0.0.1:8082", AUTH, "read"),
            ],
            false,
        );
        let new = config(
            &[
                ("a", "127.0.0.1:8081", AUTH, "read"),
                ("b", "127.0.0.1:8082", OTHER_AUTH, "read"),
            ],
            false,
        );
        let plan = Plan::between(Some(&old), &new);
        assert_eq!(
            steps(&plan),
            (
                vec![Step::Keep, Step::Start],
                vec![Step::Keep, Step::Update]
            )
        );
        assert!(plan.stop_sources.is_empty());
    }

    #[test]
    fn a_moved_listener_is_started_and_the_old_address_drains() {
        let old = config(&[("a", "127.0.0.1:8081", AUTH, "read")], false);
        let new = config(&[("a", "127.0.0.1:9091", AUTH, "read")], false);
        let plan = Plan::between(Some(&old), &new);
        assert_eq!(steps(&plan), (vec![Step::Keep], vec![Step::Start]));
        assert_eq!(
            plan.stop_listeners,
            [ListenerKey::Addr("127.0.0.1:8081".parse().unwrap())]
        );
        assert!(plan.gone.is_empty(), "same name, same series");
    }

    #[test]
    fn a_removed_upstream_stops_its_listener_source_and_series() {
        let old = config(
            &[
                ("a", "127.0.0.1:8081", AUTH, "read"),
                ("b", "127.0.0.1:8082", OTHER_AUTH, "read"),
            ],
            false,
        );
        let new = config(&[("a", "127.0.0.1:8081", AUTH, "read")], false);
        let plan = Plan::between(Some(&old), &new);
        assert_eq!(steps(&plan), (vec![Step::Keep], vec![Step::Keep]));
        assert_eq!(plan.stop_sources, [SourceKey::of(&old.upstreams[1])]);
        assert_eq!(
            plan.stop_listeners,
            [ListenerKey::Addr("127.0.0.1:8082".parse().unwrap())]
        );
        assert_eq!(plan.gone, ["b"]);
    }

    #[test]
    fn the_access_log_setting_updates_every_listener_in_place() {
        let upstreams = [
            ("a", "127.0.0.1:8081", AUTH, "read"),
            ("b", "127.0.0.1:8082", AUTH, "read"),
        ];
        let (old, new) = (config(&upstreams, false), config(&upstreams, true));
        let plan = Plan::between(Some(&old), &new);
        assert_eq!(steps(&plan), (vec![Step::Keep], vec![Step::Update; 2]));
    }

    #[test]
    fn listeners_on_port_0_are_known_by_name() {
        let old = config(&[("a", "127.0.0.1:0", AUTH, "read")], false);
        let renamed = config(&[("b", "127.0.0.1:0", AUTH, "read")], false);
        let plan = Plan::between(Some(&old), &renamed);
        assert_eq!(steps(&plan), (vec![Step::Keep], vec![Step::Start]));
        assert_eq!(plan.stop_listeners, [ListenerKey::AnyPort("a".into())]);
        assert_eq!(plan.gone, ["a"]);
        let same = config(&[("a", "127.0.0.1:0", AUTH, "read")], false);
        assert_eq!(
            steps(&Plan::between(Some(&old), &same)),
            (vec![Step::Keep], vec![Step::Keep])
        );
    }

    /// A `[[listener]]` on 127.0.0.1:3128 with routes of the given (name, path prefix).
    fn listener(routes: &[(&str, &str)]) -> Config {
        let mut text = "[[listener]]\nlisten = \"127.0.0.1:3128\"\n".to_owned();
        for (name, prefix) in routes {
            text.push_str(&format!(
                "[[listener.route]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nurl = \"https://api.example.com\"\n\
                 [listener.route.token]\nurl = \"{AUTH}\"\nclient_id = \"app\"\nclient_secret = \"s\"\n"
            ));
        }
        Config::parse(Path::new("/etc/bearerd.toml"), &text).unwrap()
    }

    #[test]
    fn a_changed_route_table_updates_its_listener_in_place() {
        let old = listener(&[("a", "/a"), ("b", "/b")]);
        let new = listener(&[("a", "/a"), ("b", "/bee"), ("c", "/c")]);
        let plan = Plan::between(Some(&old), &new);
        // One source for all three routes (equal token settings), kept.
        assert_eq!(steps(&plan), (vec![Step::Keep], vec![Step::Update]));
        assert_eq!(plan.sources[0].users.len(), 3);
        let names: Vec<&str> = plan.listeners[0]
            .routes
            .iter()
            .map(|u| u.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(plan.stop_listeners.is_empty() && plan.gone.is_empty());
        // Removing a route keeps the listener; its series go.
        let fewer = listener(&[("a", "/a")]);
        let plan = Plan::between(Some(&new), &fewer);
        assert_eq!(steps(&plan), (vec![Step::Keep], vec![Step::Update]));
        assert_eq!(plan.gone, ["b", "c"]);
    }
}
