//! Which pinned map each state map of a new load uses: the pinned map itself when its layout
//! version and shape are this build's, a new map filled from the old one when only its capacity
//! or its layout version differs and a migration from that version exists, a new empty map when
//! there is none yet; and a refusal when the data path holds a layout this build cannot read.
//!
//! The expectation comes from the embedded object itself (its map definitions, with the flow
//! table's capacity the agent asks for) and the layout versions of `lb_common::layout`, so it
//! never drifts from the program that will use the maps. Pure: tested without a kernel.

use super::pins::{MapShape, map_pin_name};
use lb_common::maps;
use std::path::{Path, PathBuf};

/// The maps of the object that the data path's state lives in (`lb_common::layout::PINNED`);
/// every other map (`CONFIG`, the next-hop cache, debug switches, the log ring, the other
/// programs' maps) belongs to one loaded program and is fresh for each.
pub(crate) fn pinned_maps() -> &'static [(&'static str, u32)] {
    lb_common::layout::PINNED
}

/// A map this build expects: name, layout version, shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    pub(crate) name: &'static str,
    pub(crate) version: u32,
    pub(crate) shape: MapShape,
}

/// A map found pinned in the data path's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) shape: MapShape,
    pub(crate) path: PathBuf,
}

/// Where a new map's entries come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Source {
    pub(crate) path: PathBuf,
    pub(crate) version: u32,
    pub(crate) shape: MapShape,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// The pinned map as it is.
    Reuse,
    /// A new, empty map.
    Create,
    /// A new map, filled from `Source` (a capacity change, or an older layout version with a
    /// migration) before the program swap and once more after it.
    Copy(Source),
}

/// What one pinned map of the new load is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MapPlan {
    pub(crate) name: &'static str,
    pub(crate) version: u32,
    pub(crate) shape: MapShape,
    /// Where the loader binds it: the data path's directory for reused maps and on a first
    /// attach, `staging/` for new maps of a running data path (published after the swap).
    pub(crate) pin: PathBuf,
    pub(crate) action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "incompatible data path state: {} holds {name} in layout version {found}, and this xlb (version {want}) cannot convert it; `xlb detach` removes that data path (its flows and counters are lost) before this xlb can attach",
        dir.display()
    )]
    NoMigration {
        dir: PathBuf,
        name: String,
        found: u32,
        want: u32,
    },
    #[error(
        "corrupt data path state: {} ({:?}) does not have the shape of {name} version {version} ({:?}); `xlb detach` removes that data path",
        path.display(), found, want
    )]
    Shape {
        path: PathBuf,
        name: String,
        version: u32,
        found: MapShape,
        want: MapShape,
    },
}

/// Layout migrations this build knows, (map, from version): the older layouts of the flow table
/// and the embryonic table (`migrate::decode_flow`), and of `VIPS` (`migrate::upgrade_value`).
pub(crate) fn can_migrate(name: &str, from: u32, to: u32) -> bool {
    use super::migrate::{flow_layout, flow_value_size};
    if from == to {
        return false;
    }
    match name {
        maps::FLOWS | maps::EMBRYOS => flow_value_size(flow_layout(name, from)).is_some(),
        // A ring buffer's records are not kept across a load: a new ring of any layout.
        maps::FLOW_EVENTS => true,
        _ => super::migrate::has_upgrade(name, from, to),
    }
}

/// Plan every expected map against what `dir` holds. `adopting`: a program runs on these maps
/// now, so new maps go to `staging/` and appear only after the swap; otherwise (a first attach)
/// the directory holds nothing of value and new maps go straight into it.
pub(crate) fn plan(
    dir: &Path,
    expected: &[Expected],
    found: &[Found],
    adopting: bool,
) -> Result<Vec<MapPlan>, PlanError> {
    let new_home = if adopting {
        dir.join(super::pins::STAGING)
    } else {
        dir.to_path_buf()
    };
    let mut plans = Vec::with_capacity(expected.len());
    for want in expected {
        let pin_name = map_pin_name(want.name, want.version);
        let staged = |action| MapPlan {
            name: want.name,
            version: want.version,
            shape: want.shape,
            pin: new_home.join(&pin_name),
            action,
        };
        let candidates: Vec<&Found> = if adopting {
            found.iter().filter(|f| f.name == want.name).collect()
        } else {
            Vec::new()
        };
        let same_version = candidates.iter().find(|f| f.version == want.version);
        let plan = match same_version {
            Some(f) if !f.shape.same_layout(&want.shape) => {
                return Err(PlanError::Shape {
                    path: f.path.clone(),
                    name: want.name.to_string(),
                    version: want.version,
                    found: f.shape,
                    want: want.shape,
                });
            }
            Some(f) if f.shape.max_entries == want.shape.max_entries => MapPlan {
                name: want.name,
                version: want.version,
                shape: want.shape,
                pin: f.path.clone(),
                action: Action::Reuse,
            },
            Some(f) => staged(Action::Copy(Source {
                path: f.path.clone(),
                version: f.version,
                shape: f.shape,
            })),
            None => match candidates.iter().max_by_key(|f| f.version) {
                None => staged(Action::Create),
                Some(f) if can_migrate(want.name, f.version, want.version) => {
                    staged(Action::Copy(Source {
                        path: f.path.clone(),
                        version: f.version,
                        shape: f.shape,
                    }))
                }
                Some(f) => {
                    return Err(PlanError::NoMigration {
                        dir: dir.to_path_buf(),
                        name: want.name.to_string(),
                        found: f.version,
                        want: want.version,
                    });
                }
            },
        };
        plans.push(plan);
    }
    Ok(plans)
}

/// The pins a published plan leaves behind: other versions of planned maps, and maps this build
/// does not have. Removed after a successful swap.
pub(crate) fn obsolete<'a>(plans: &[MapPlan], found: &'a [Found]) -> Vec<&'a Found> {
    found
        .iter()
        .filter(|f| {
            !plans
                .iter()
                .any(|p| p.name == f.name && p.version == f.version)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LRU: u32 = 9;
    const ARRAY: u32 = 2;

    fn shape(map_type: u32, value_size: u32, max_entries: u32) -> MapShape {
        MapShape {
            map_type,
            key_size: 16,
            value_size,
            max_entries,
            flags: 0,
        }
    }
    fn expected() -> Vec<Expected> {
        vec![
            Expected {
                name: maps::FLOWS,
                version: 2,
                shape: shape(LRU, 24, 1000),
            },
            Expected {
                name: maps::RINGS,
                version: 1,
                shape: shape(ARRAY, 4, 10),
            },
        ]
    }
    fn found(name: &str, version: u32, shape: MapShape) -> Found {
        Found {
            name: name.into(),
            version,
            shape,
            path: PathBuf::from(format!("/b/xlb/d/{name}-v{version}")),
        }
    }
    fn dir() -> &'static Path {
        Path::new("/b/xlb/d")
    }

    #[test]
    fn a_first_attach_creates_every_map_in_the_directory() {
        // Pins left by an attach that never finished are not adopted.
        let left = [found(maps::FLOWS, 2, shape(LRU, 24, 1000))];
        let p = plan(dir(), &expected(), &left, false).unwrap();
        assert!(p.iter().all(|m| m.action == Action::Create));
        assert_eq!(p[0].pin, PathBuf::from("/b/xlb/d/FLOWS-v2"));
    }

    #[test]
    fn adoption_reuses_same_version_and_shape_and_stages_the_rest() {
        let f = [
            found(maps::FLOWS, 2, shape(LRU, 24, 1000)),
            found(maps::RINGS, 1, shape(ARRAY, 4, 12)),
        ];
        let p = plan(dir(), &expected(), &f, true).unwrap();
        assert_eq!(p[0].action, Action::Reuse);
        assert_eq!(p[0].pin, f[0].path);
        // Another capacity: a new map in staging, filled from the old one.
        assert_eq!(
            p[1].action,
            Action::Copy(Source {
                path: f[1].path.clone(),
                version: 1,
                shape: f[1].shape
            })
        );
        assert_eq!(p[1].pin, PathBuf::from("/b/xlb/d/staging/RINGS-v1"));
        // A map the running data path does not have yet: new, in staging.
        let p = plan(dir(), &expected(), &f[..1], true).unwrap();
        assert_eq!(p[1].action, Action::Create);
        assert_eq!(p[1].pin, PathBuf::from("/b/xlb/d/staging/RINGS-v1"));
    }

    #[test]
    fn an_older_flow_table_is_migrated_and_an_unknown_version_refused() {
        let f = [found(maps::FLOWS, 1, shape(LRU, 16, 1000))];
        let p = plan(dir(), &expected(), &f, true).unwrap();
        assert!(matches!(&p[0].action, Action::Copy(s) if s.version == 1));
        assert_eq!(obsolete(&p, &f), vec![&f[0]]);

        // A newer build's layout (or one no decoder exists for): refused, nothing planned.
        let f = [found(maps::FLOWS, 9, shape(LRU, 32, 1000))];
        let e = plan(dir(), &expected(), &f, true).unwrap_err();
        assert!(matches!(
            e,
            PlanError::NoMigration {
                found: 9,
                want: 2,
                ..
            }
        ));
        assert!(e.to_string().contains("xlb detach"), "{e}");
        // No migration exists for other maps.
        let e = plan(
            dir(),
            &expected(),
            &[found(maps::RINGS, 0, shape(ARRAY, 4, 10))],
            true,
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::NoMigration { .. }));
        // The VIPs of a build without the door are converted; the embryonic table follows the
        // flow table's layouts.
        assert!(can_migrate(maps::VIPS, 1, 2));
        assert!(!can_migrate(maps::VIPS, 2, 1));
        assert!(!can_migrate(maps::EMBRYOS, 8, 1));
        assert!(!can_migrate(maps::DENY[0], 0, 1));
    }

    #[test]
    fn same_version_with_another_layout_is_corrupt() {
        let f = [found(maps::FLOWS, 2, shape(LRU, 16, 1000))];
        let e = plan(dir(), &expected(), &f, true).unwrap_err();
        assert!(matches!(e, PlanError::Shape { version: 2, .. }), "{e}");
        let f = [found(maps::FLOWS, 2, shape(ARRAY, 24, 1000))];
        assert!(plan(dir(), &expected(), &f, true).is_err());
    }

    #[test]
    fn leftovers_are_obsolete_after_publishing() {
        let f = [
            found(maps::FLOWS, 2, shape(LRU, 24, 1000)),
            found(maps::FLOWS, 1, shape(LRU, 16, 1000)),
            found("GONE", 1, shape(ARRAY, 4, 1)),
        ];
        let p = plan(dir(), &expected(), &f, true).unwrap();
        assert_eq!(p[0].action, Action::Reuse, "the current version wins");
        let names: Vec<String> = obsolete(&p, &f)
            .iter()
            .map(|f| format!("{}-v{}", f.name, f.version))
            .collect();
        assert_eq!(names, ["FLOWS-v1", "GONE-v1"]);
    }
}
