//! `--plot`: three stacked panels over simulated time: host utilisation (mean and
//! spread), active hosts, and migrations started per interval.

use std::path::Path;

use plotters::prelude::*;
use tern_sim::Report;

pub fn draw(path: &Path, report: &Report) -> anyhow::Result<()> {
    let s = &report.series;
    let hours = s.last().map_or(1.0, |p| p.hours).max(1e-9);
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "tern sim: {} on {} hosts / {} VMs ({} migrations, {:.1} kWh)",
        report.policy, report.hosts, report.vms, report.migrations, report.energy_kwh
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(err)?;
    let panels = root.split_evenly((3, 1));

    let mut c = ChartBuilder::on(&panels[0])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .caption(
            "CPU utilisation of active hosts (mean ± std dev)",
            ("sans-serif", 15),
        )
        .build_cartesian_2d(0.0..hours, 0.0..1.0)
        .map_err(err)?;
    c.configure_mesh().x_desc("hours").draw().map_err(err)?;
    c.draw_series(AreaSeries::new(
        s.iter()
            .map(|p| (p.hours, (p.utilisation_mean + p.utilisation_std).min(1.0))),
        0.0,
        BLUE.mix(0.15),
    ))
    .map_err(err)?;
    c.draw_series(LineSeries::new(
        s.iter().map(|p| (p.hours, p.utilisation_mean)),
        BLUE.stroke_width(2),
    ))
    .map_err(err)?
    .label("mean")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(
        s.iter().map(|p| (p.hours, p.utilisation_std)),
        RED.stroke_width(2),
    ))
    .map_err(err)?
    .label("std dev (spread)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    let max_active = s.iter().map(|p| p.active_hosts).max().unwrap_or(1).max(1);
    let mut c = ChartBuilder::on(&panels[1])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .caption("active hosts", ("sans-serif", 15))
        .build_cartesian_2d(0.0..hours, 0u32..max_active + max_active / 10 + 1)
        .map_err(err)?;
    c.configure_mesh().x_desc("hours").draw().map_err(err)?;
    c.draw_series(LineSeries::new(
        s.iter().map(|p| (p.hours, p.active_hosts)),
        GREEN.stroke_width(2),
    ))
    .map_err(err)?;

    let max_mig = s.iter().map(|p| p.migrations).max().unwrap_or(1).max(1);
    let mut c = ChartBuilder::on(&panels[2])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .caption("migrations started per interval", ("sans-serif", 15))
        .build_cartesian_2d(0.0..hours, 0u32..max_mig + max_mig / 10 + 1)
        .map_err(err)?;
    c.configure_mesh().x_desc("hours").draw().map_err(err)?;
    c.draw_series(
        s.iter()
            .map(|p| Circle::new((p.hours, p.migrations), 2, MAGENTA.filled())),
    )
    .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}
