//! The model with the costs of tern's own engine (`tern-agent`'s migration source), so
//! that it predicts what `tern bench migration` measures and the simulator times
//! migrations as the engine would run them. Each default is measured on the engine;
//! docs/migration-model.md has the runs they were fitted to and the errors left.

use super::MigrationParams;
use crate::policy::DEFAULT_DOWNTIME_LIMIT_S;
use crate::precopy;

/// Share of the link's nominal rate the engine's TCP streams achieve: round 1 of an idle
/// guest moves 104.8 MB in 884-888 ms (512 MiB) and 112.2 MB in 948-954 ms (1 GiB) over
/// a 125 MB/s `tbf` link, 118 MB/s; busy guests' round 2 runs at 115-118 MB/s.
pub const ENGINE_LINK_EFFICIENCY: f64 = 0.944;

/// One hashing pass over guest memory (two threads taking 8 MiB at a time), per GiB of
/// non-zero memory (holes cost next to nothing): over three sets of `tern bench
/// migration` (512 MiB and 1 GiB, 0-150 %), the passes after round 2 on with a busy
/// guest running beside them took 9.2-25.4 ms (median 13.2) over its 227-236 MB, the
/// final passes with it paused 8.5-24.4 ms (median 11). It was 0.09 (28 passes over
/// 220-228 MB of 12.8-72.7 ms, median 17.2, paused 14.0-36.4 ms) while each thread took
/// half of memory and the pass ended with the half that held most data, and 0.2 before
/// that, while the source unmapped guest memory inside the final pass.
pub const ENGINE_SCAN_S_PER_GIB: f64 = 0.055;

/// From the migration request to round 1's first page: the destination's prepare
/// (which answers before its QEMU starts) and connecting the streams; round 1's baseline
/// scan runs beside its first stretch. An idle guest's total less round 1, the scan
/// after it and the downtime: 30-36 ms; with a busy guest on the same two cores the
/// source's own phases show 50-65 ms. It was 0.12 s while the destination's QEMU
/// started before the prepare answered and the baseline scan ran before round 1.
pub const ENGINE_SETUP_S: f64 = 0.045;

/// Device state and resume on the destination, after the final pass: the benchmark's
/// `downtime_parts_ms`, second and third part, over the 240 runs of ten sets of `tern
/// bench migration` at 0-150 % (512 MiB and 1 GiB): 7-21 ms, 10th-90th percentile 9-15,
/// median 12. The same machine gave a median of 9 over 72 runs earlier that day and 12
/// over 152 runs before: it moves with the host's load by a few milliseconds.
pub const ENGINE_STOP_OVERHEAD_S: f64 = 0.012;

/// Share of its vCPU a TCG guest running `memdirty` needs for its writes: under the
/// benchmark's throttles it kept writing at about 12 MB/s plus
/// `rate × (1 − p/100) / 0.28`. Round 1's throttled rate in 19 runs at 94 MB/s: 74.7
/// MB/s on average at 81 %, 72.7 at 82, 69 at 83, 64.8 at 84, 66.5 at 85, 57 at 86,
/// 48 at 89 (this gives 75.8, 72.4, 69.1, 65.7, 62.4, 59.0, 48.9); under 95 %, 25-33
/// MB/s at 94 MB/s and 37-45 at 188 (28.8 and 45.6). It was 0.31 with a 14 MB/s floor,
/// which gave 3-7 MB/s less at 81-85 %: there the throttled writer keeps pace with one
/// of the copy's two fronts or pulls ahead of it, which decides round 1's remainder.
pub const ENGINE_GUEST_WRITE_CPU_SHARE: f64 = 0.28;

/// What the engine's `dependency-aware` source waits for beyond what the other
/// policies do: the guest's `thaw` on the destination after the resume, which the
/// migration's total includes (95-170 ms under TCG, where the guest's first work on a
/// new host is slow), and what is left of the guest's `freeze` (asked as the
/// migration starts; round 1 no longer waits for it, its probe does). Fitted when
/// round 1 still waited for the freeze: three of `tern bench dependency`'s runs at
/// 150 %, predicted with 0.76 s less measured, 0.15 s. Kept since: the full bench with
/// the thaw in the resume and round 1 beside the freeze ran -5.1 % (150 %) and -6.1 %
/// (75 %) on the total's median with it.
pub const ENGINE_FREEZE_S: f64 = 0.15;

/// Round 1's baseline scan beside its first stretch, as the probe's rate sees it: it
/// counts changes from each page's reading but rates them over the time from the
/// scan's end, so it sees the guest's rate that much high. The engine's probe (debug
/// line `round 1 probe`) rated 31, 94 and 188 MB/s writers at 30-41, 80-114 and
/// 177-203 MB/s, medians 2-8 % high; 0.02 s gives 5 % with the engine's 24 MiB first
/// stretch.
pub const ENGINE_BASELINE_SCAN_S: f64 = 0.02;

/// What a throttled `memdirty` keeps writing on top of what its CPU share allows
/// (fitted with [`ENGINE_GUEST_WRITE_CPU_SHARE`]).
pub const ENGINE_GUEST_THROTTLE_FLOOR_BYTES_PER_S: f64 = 12e6;

/// An idle guest's stop costs as they follow the host's pace in that run, as (fixed
/// seconds, share of round 1's probe scan) for the final pass's scan and for device
/// state with resume. With the guest idle nothing but the engine runs on the host, so
/// how long round 1's probe took over guest memory could say how fast the stop will
/// run. While the engine's scan threads each took half of memory it did (30 idle runs:
/// 3.0 ms + 0.24 × the probe's scan and 7.7 ms + 0.26 × it, pauses of 16-23 ms beside
/// probes of 10-15 ms and 29-38 ms beside 22-30 ms); since they share it out in 8 MiB
/// pieces the passes take 5.5-9.6 ms whatever the probe saw, and over 18 idle runs of
/// three sets (512 MiB and 1 GiB, probes of 7-15 ms) the final pass less its pages'
/// transfer took 4.0 ms + 0.04 × it and device state with resume 8.5 ms + 0.15 × it
/// (correlations 0.04 and 0.12: nearly constants now).
pub const ENGINE_IDLE_STOP_FROM_PROBE: [(f64, f64); 2] = [(0.0040, 0.04), (0.0085, 0.15)];

/// An idle guest's stop costs as they follow the engine's scan after round 1 (the one
/// its stop rule weighed, read from the predicted downtime it reported less the
/// remainder's transfer and the stop cost it assumes), in the form of
/// [`ENGINE_IDLE_STOP_FROM_PROBE`]. The same pass over the same memory a moment before
/// the pause: over 18 idle runs of three sets (512 MiB and 1 GiB guests, scans of
/// 5.5-9.6 ms) the final pass less its pages' transfer took 2.0 ms + 0.32 × that scan
/// (correlation 0.29) and device state with resume a median 9.5 ms, unrelated to it.
/// (Before the scan threads shared memory out in pieces, scans of 5.6-17.8 ms gave
/// 0.2 ms + 0.66 × it and 7.4 ms + 0.32 × it, correlating 0.65 with the whole stop.)
pub const ENGINE_IDLE_STOP_FROM_ROUND_ONE_SCAN: [(f64, f64); 2] = [(0.0020, 0.32), (0.0095, 0.0)];

impl MigrationParams {
    /// These parameters with an idle guest's stop costs set from how long round 1's
    /// probe took to scan guest memory ([`ENGINE_IDLE_STOP_FROM_PROBE`]).
    pub fn with_idle_stop_costs(self, probe_scan_s: f64) -> Self {
        self.with_idle_stop_fit(ENGINE_IDLE_STOP_FROM_PROBE, probe_scan_s)
    }

    /// These parameters with an idle guest's stop costs set from how long the engine's
    /// scan after round 1 took ([`ENGINE_IDLE_STOP_FROM_ROUND_ONE_SCAN`]).
    pub fn with_idle_stop_costs_after_round_one(self, scan_s: f64) -> Self {
        self.with_idle_stop_fit(ENGINE_IDLE_STOP_FROM_ROUND_ONE_SCAN, scan_s)
    }

    fn with_idle_stop_fit(mut self, fit: [(f64, f64); 2], reading_s: f64) -> Self {
        let [(scan_fixed, scan_share), (stop_fixed, stop_share)] = fit;
        let scan_s = scan_fixed + scan_share * reading_s.max(0.0);
        let gib = (self.nonzero_pages() * self.page_size) as f64 / (1u64 << 30) as f64;
        if gib > 0.0 {
            self.scan_s_per_gib = scan_s / gib;
        }
        self.stop_overhead_s = stop_fixed + stop_share * reading_s.max(0.0);
        self
    }

    /// A migration as tern's engine runs it: a guest of `memory_bytes`, of which
    /// `nonzero_bytes` hold data, over a link of `link_bytes_per_s` nominal, with the
    /// engine's measured costs, its own rules and defaults ([`precopy`]: round-1 probe,
    /// round cap, the stop cost its policy is told) and QEMU's 300 ms budget.
    pub fn engine(memory_bytes: u64, nonzero_bytes: u64, link_bytes_per_s: f64) -> Self {
        MigrationParams {
            nonzero_bytes: Some(nonzero_bytes),
            link_efficiency: ENGINE_LINK_EFFICIENCY,
            scan_s_per_gib: ENGINE_SCAN_S_PER_GIB,
            setup_s: ENGINE_SETUP_S,
            stop_overhead_s: ENGINE_STOP_OVERHEAD_S,
            policy_stop_cost_s: Some(precopy::STOP_COST_S),
            probe_bytes: precopy::PROBE_BYTES,
            max_rounds: precopy::MAX_ROUNDS,
            write_cpu_share: Some(ENGINE_GUEST_WRITE_CPU_SHARE),
            throttle_floor_bytes_per_s: ENGINE_GUEST_THROTTLE_FLOOR_BYTES_PER_S,
            sent_in_order: true,
            streams: precopy::STREAMS,
            baseline_scan_s: ENGINE_BASELINE_SCAN_S,
            downtime_limit_s: DEFAULT_DOWNTIME_LIMIT_S,
            freeze_s: ENGINE_FREEZE_S,
            throttle_period_s: precopy::THROTTLE_PERIOD_US as f64 / 1e6,
            ..MigrationParams::new(memory_bytes, link_bytes_per_s)
        }
    }
}
