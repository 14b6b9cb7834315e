//! The loss curve as a small standalone SVG.

pub fn loss_curve(losses: &[f64]) -> String {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let finite: Vec<f64> = losses.iter().cloned().filter(|x| x.is_finite()).collect();
    let max = finite.iter().cloned().fold(f64::MIN, f64::max).max(1e-9);
    let min = finite.iter().cloned().fold(f64::MAX, f64::min).min(max);
    let span = (max - min).max(1e-9);
    let n = losses.len().max(2) - 1;
    let points: Vec<String> = losses
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let x = pad + (w - 2.0 * pad) * i as f64 / n as f64;
            let y = h - pad - (h - 2.0 * pad) * (l - min) / span;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">training loss by step (min {min:.3}, max {max:.3}, {count} steps)</text>
<line x1="{pad}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="#888"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{yb}" stroke="#888"/>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{pts}"/>
</svg>
"##,
        yb = h - pad,
        xr = w - pad,
        count = losses.len(),
        pts = points.join(" ")
    )
}
