//! Host power as a function of CPU utilisation: SPECpower tables with eleven points
//! (0 %, 10 %, ... 100 %) and linear interpolation between them, as CloudSim does.

use serde::{Deserialize, Serialize};

/// Watts at 0 %, 10 %, ... 100 % CPU utilisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PowerModel {
    pub watts: [f64; 11],
}

/// HP ProLiant ML110 G4 (Xeon 3040), SPECpower_ssj2008.
pub const HP_ML110_G4: PowerModel = PowerModel {
    watts: [
        86.0, 89.4, 92.6, 96.0, 99.5, 102.0, 106.0, 108.0, 112.0, 114.0, 117.0,
    ],
};

/// HP ProLiant ML110 G5 (Xeon 3075), SPECpower_ssj2008.
pub const HP_ML110_G5: PowerModel = PowerModel {
    watts: [
        93.7, 97.0, 101.0, 105.0, 110.0, 116.0, 121.0, 125.0, 129.0, 133.0, 135.0,
    ],
};

impl PowerModel {
    /// Looks a built-in table up by the name scenario files use.
    pub fn named(name: &str) -> Option<PowerModel> {
        match name {
            "hp-ml110-g4" => Some(HP_ML110_G4),
            "hp-ml110-g5" => Some(HP_ML110_G5),
            _ => None,
        }
    }

    /// Power draw at `utilisation` (clamped to 0..=1), interpolated between table points.
    pub fn watts_at(&self, utilisation: f64) -> f64 {
        let u = utilisation.clamp(0.0, 1.0) * 10.0;
        let lo = (u.floor() as usize).min(9);
        let frac = u - lo as f64;
        self.watts[lo] + (self.watts[lo + 1] - self.watts[lo]) * frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_points_are_exact_and_midpoints_interpolate() {
        assert_eq!(HP_ML110_G4.watts_at(0.0), 86.0);
        assert_eq!(HP_ML110_G4.watts_at(1.0), 117.0);
        assert!((HP_ML110_G5.watts_at(0.45) - 113.0).abs() < 1e-9);
        assert!((HP_ML110_G4.watts_at(0.05) - 87.7).abs() < 1e-9);
    }

    #[test]
    fn out_of_range_utilisation_is_clamped() {
        assert_eq!(HP_ML110_G5.watts_at(1.5), 135.0);
        assert_eq!(HP_ML110_G5.watts_at(-0.1), 93.7);
    }

    #[test]
    fn names_resolve() {
        assert_eq!(PowerModel::named("hp-ml110-g4"), Some(HP_ML110_G4));
        assert_eq!(PowerModel::named("nope"), None);
    }
}
