//! `tern plan --plot`: per-node load before and after the plan, one panel per
//! measure (memory in use, vCPUs per physical CPU, primary instances), nodes in
//! file order, so the flattening is visible at a glance.

use plotters::prelude::*;
use tern_balance::metric::Metric;
use tern_model::Cluster;

/// Per-node measures of one placement.
struct Loads {
    mem: Vec<f64>,
    vcpu: Vec<f64>,
    primaries: Vec<f64>,
}

fn loads(c: &Cluster) -> Loads {
    let n = c.nodes.len();
    let mut l = Loads {
        mem: vec![0.0; n],
        vcpu: vec![0.0; n],
        primaries: vec![0.0; n],
    };
    for inst in &c.instances {
        let p = inst.primary.index();
        if inst.status.uses_memory() {
            l.mem[p] += inst.mem as f64;
            l.vcpu[p] += inst.vcpus as f64;
        }
        l.primaries[p] += 1.0;
    }
    for (i, node) in c.nodes.iter().enumerate() {
        l.mem[i] /= node.total_mem.max(1.0);
        l.vcpu[i] /= node.pcpus.max(1.0);
    }
    l
}

/// The SVG document, as text.
pub fn render<M: Metric>(before: &Cluster, after: &Cluster, metric: &M) -> anyhow::Result<String> {
    let (b, a) = (loads(before), loads(after));
    let n = before.nodes.len().max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let title = format!(
            "tern plan ({} metric): per-node load before and after, {} nodes",
            metric.name(),
            before.nodes.len()
        );
        let root = root.titled(&title, ("sans-serif", 20)).map_err(err)?;
        let panels = root.split_evenly((3, 1));
        let series = [
            ("memory in use / node memory", &b.mem, &a.mem),
            ("vCPUs per physical CPU", &b.vcpu, &a.vcpu),
            ("primary instances", &b.primaries, &a.primaries),
        ];
        for (panel, (caption, before, after)) in panels.iter().zip(series) {
            let top = before
                .iter()
                .chain(after.iter())
                .fold(0.0, |m: f64, v| m.max(*v));
            let mut chart = ChartBuilder::on(panel)
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .caption(caption, ("sans-serif", 15))
                .build_cartesian_2d(0..n, 0.0..top * 1.1 + 1e-9)
                .map_err(err)?;
            chart.configure_mesh().x_desc("node").draw().map_err(err)?;
            for (label, values, color) in [("before", before, RED), ("after", after, BLUE)] {
                chart
                    .draw_series(LineSeries::new(
                        values.iter().enumerate().map(|(i, v)| (i, *v)),
                        color.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}
