/**
 * A small SVG writer for latency curves: microseconds (log scale) against batch size (log scale),
 * one polyline with markers per measured series, a dashed line for a floor (the memory floor),
 * axis ticks, grid, labels and a legend. No dependencies; the output is a standalone SVG file.
 *
 * @example
 * ```ts
 * const svg = renderLatencySvg([
 *   { name: "tuned", points: [{ batchSize: 1, us: 20 }, { batchSize: 64, us: 250 }] },
 *   { name: "memory floor", kind: "floor", points: [{ batchSize: 1, us: 9 }, { batchSize: 64, us: 210 }] },
 * ], { title: "E=257 N=256 K=7168 top-k 9" });
 * await Deno.writeTextFile("latency.svg", svg);
 * ```
 *
 * @module
 */

/** One measurement. */
export interface LatencyPoint {
  /** Tokens (x axis). */
  batchSize: number;
  /** Microseconds (y axis). */
  us: number;
}

/** One curve. */
export interface LatencySeries {
  /** Legend text; also the `data-series` attribute of the curve's group. */
  name: string;
  /** Points in any order; points with a non-positive or non-finite value are left out. */
  points: readonly LatencyPoint[];
  /** `"measured"` (default): line and markers; `"floor"`: a dashed line without markers. */
  kind?: "measured" | "floor";
  /** CSS colour; default from a fixed palette by position. */
  color?: string;
}

/** Options of {@link renderLatencySvg}. */
export interface LatencySvgOptions {
  /** Heading above the plot. */
  title?: string;
  /** A second, smaller line (card, date, ...). */
  subtitle?: string;
  /** Pixels; default 900. */
  width?: number;
  /** Pixels; default 540. */
  height?: number;
  /** Default "batch size (tokens)". */
  xLabel?: string;
  /** Default "latency (µs)". */
  yLabel?: string;
}

const PALETTE = ["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"];
const FLOOR_COLOR = "#555555";

/** Escapes text for SVG content and attribute values. */
export function escapeXml(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function n(v: number): string {
  return (Math.round(v * 10) / 10).toString();
}

/** A y tick label: 0.5, 1, 20, 500, 1k, 2k, 10k, 1M. */
function shortNumber(v: number): string {
  const trim = (x: number): string => (Math.round(x * 100) / 100).toString();
  if (v >= 1e6) return `${trim(v / 1e6)}M`;
  if (v >= 1e3) return `${trim(v / 1e3)}k`;
  return trim(v);
}

/** Microseconds for a tooltip. */
function usText(us: number): string {
  return us >= 100 ? us.toFixed(0) : us >= 10 ? us.toFixed(1) : us.toFixed(2);
}

/** Powers of two from `lo` to `hi` (inclusive, both > 0); every other one if there are many. */
function xTicks(lo: number, hi: number): number[] {
  const ticks: number[] = [];
  for (let e = Math.ceil(Math.log2(lo) - 1e-9); 2 ** e <= hi * (1 + 1e-9); e++) ticks.push(2 ** e);
  if (ticks.length <= 14) return ticks;
  return ticks.filter((_, i) => i % 2 === 0);
}

/** 1-2-5 ticks from `lo` to `hi` (both > 0); only powers of ten if there are many. */
function yTicks(lo: number, hi: number): number[] {
  const ticks: number[] = [];
  for (let d = Math.floor(Math.log10(lo)) - 1; 10 ** d <= hi * 10; d++) {
    for (const m of [1, 2, 5]) {
      const v = m * 10 ** d;
      if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push(Number(v.toPrecision(6)));
    }
  }
  if (ticks.length <= 12) return ticks;
  return ticks.filter((v) => Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9);
}

/**
 * Renders the series as an SVG document (a string): log-log axes spanning every point, grid
 * lines at the ticks, each measured series as a polyline with circle markers (each marker has a
 * `<title>` tooltip with its values), floors dashed, a legend on the right.
 */
export function renderLatencySvg(
  series: readonly LatencySeries[],
  options: LatencySvgOptions = {},
): string {
  const width = options.width ?? 900;
  const height = options.height ?? 540;
  const xLabel = options.xLabel ?? "batch size (tokens)";
  const yLabel = options.yLabel ?? "latency (µs)";
  const margin = { left: 72, right: 190, top: options.subtitle ? 66 : 48, bottom: 56 };
  const plotW = Math.max(50, width - margin.left - margin.right);
  const plotH = Math.max(50, height - margin.top - margin.bottom);

  const clean = series.map((s, i) => ({
    ...s,
    kind: s.kind ?? "measured",
    color: s.color ?? (s.kind === "floor" ? FLOOR_COLOR : PALETTE[i % PALETTE.length]),
    points: s.points
      .filter((p) =>
        Number.isFinite(p.batchSize) && p.batchSize > 0 && Number.isFinite(p.us) && p.us > 0
      )
      .slice()
      .sort((a, b) => a.batchSize - b.batchSize),
  }));
  const all = clean.flatMap((s) => s.points);
  let [x0, x1] = all.length > 0
    ? [Math.min(...all.map((p) => p.batchSize)), Math.max(...all.map((p) => p.batchSize))]
    : [1, 8192];
  let [y0, y1] = all.length > 0
    ? [Math.min(...all.map((p) => p.us)), Math.max(...all.map((p) => p.us))]
    : [1, 1000];
  if (x1 / x0 < 2) [x0, x1] = [x0 / 2, x1 * 2];
  if (y1 / y0 < 2) [y0, y1] = [y0 / 1.5, y1 * 1.5];
  // A little room around the data, in log space.
  const lx0 = Math.log2(x0) - 0.3, lx1 = Math.log2(x1) + 0.3;
  const ly0 = Math.log10(y0) - 0.08, ly1 = Math.log10(y1) + 0.08;
  const px = (x: number): number => margin.left + (Math.log2(x) - lx0) / (lx1 - lx0) * plotW;
  const py = (y: number): number =>
    margin.top + plotH - (Math.log10(y) - ly0) / (ly1 - ly0) * plotH;

  const out: string[] = [];
  out.push(`<?xml version="1.0" encoding="UTF-8"?>`);
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
      `viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif" ` +
      `font-size="12">`,
  );
  out.push(`<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`);
  if (options.title) {
    out.push(
      `<text x="${margin.left}" y="24" font-size="16" font-weight="bold">` +
        `${escapeXml(options.title)}</text>`,
    );
  }
  if (options.subtitle) {
    out.push(
      `<text x="${margin.left}" y="44" font-size="12" fill="#444444">` +
        `${escapeXml(options.subtitle)}</text>`,
    );
  }

  // Grid, ticks and tick labels.
  const bottom = margin.top + plotH;
  out.push(`<g class="grid" stroke="#e4e4e4" stroke-width="1">`);
  const xt = xTicks(2 ** lx0, 2 ** lx1);
  const yt = yTicks(10 ** ly0, 10 ** ly1);
  for (const t of xt) {
    out.push(`<line x1="${n(px(t))}" y1="${margin.top}" x2="${n(px(t))}" y2="${n(bottom)}"/>`);
  }
  for (const t of yt) {
    out.push(
      `<line x1="${margin.left}" y1="${n(py(t))}" x2="${n(margin.left + plotW)}" ` +
        `y2="${n(py(t))}"/>`,
    );
  }
  out.push(`</g>`);
  out.push(
    `<rect x="${margin.left}" y="${margin.top}" width="${n(plotW)}" height="${n(plotH)}" ` +
      `fill="none" stroke="#333333"/>`,
  );
  out.push(`<g class="ticks" fill="#333333">`);
  for (const t of xt) {
    out.push(
      `<line x1="${n(px(t))}" y1="${n(bottom)}" x2="${n(px(t))}" y2="${n(bottom + 5)}" ` +
        `stroke="#333333"/>`,
    );
    out.push(
      `<text x="${n(px(t))}" y="${n(bottom + 18)}" text-anchor="middle">${t}</text>`,
    );
  }
  for (const t of yt) {
    out.push(
      `<line x1="${margin.left - 5}" y1="${n(py(t))}" x2="${margin.left}" y2="${n(py(t))}" ` +
        `stroke="#333333"/>`,
    );
    out.push(
      `<text x="${margin.left - 8}" y="${n(py(t) + 4)}" text-anchor="end">` +
        `${shortNumber(t)}</text>`,
    );
  }
  out.push(`</g>`);
  out.push(
    `<text x="${n(margin.left + plotW / 2)}" y="${n(height - 14)}" text-anchor="middle">` +
      `${escapeXml(xLabel)}</text>`,
  );
  const yMid = margin.top + plotH / 2;
  out.push(
    `<text x="18" y="${n(yMid)}" text-anchor="middle" transform="rotate(-90 18 ${n(yMid)})">` +
      `${escapeXml(yLabel)}</text>`,
  );

  // Curves.
  for (const s of clean) {
    const name = escapeXml(s.name);
    out.push(`<g class="series" data-series="${name}">`);
    if (s.points.length > 0) {
      const coords = s.points.map((p) => `${n(px(p.batchSize))},${n(py(p.us))}`).join(" ");
      const dash = s.kind === "floor" ? ` stroke-dasharray="6 4"` : "";
      out.push(
        `<polyline points="${coords}" fill="none" stroke="${escapeXml(s.color)}" ` +
          `stroke-width="${s.kind === "floor" ? 1.5 : 2}"${dash}/>`,
      );
      if (s.kind !== "floor") {
        for (const p of s.points) {
          out.push(
            `<circle cx="${n(px(p.batchSize))}" cy="${n(py(p.us))}" r="3" ` +
              `fill="${escapeXml(s.color)}"><title>${name}: ${p.batchSize} tokens, ` +
              `${usText(p.us)} µs</title></circle>`,
          );
        }
      }
    }
    out.push(`</g>`);
  }

  // Legend.
  const lx = margin.left + plotW + 16;
  out.push(`<g class="legend">`);
  clean.forEach((s, i) => {
    const y = margin.top + 12 + i * 22;
    const dash = s.kind === "floor" ? ` stroke-dasharray="6 4"` : "";
    out.push(
      `<line x1="${n(lx)}" y1="${y}" x2="${n(lx + 26)}" y2="${y}" ` +
        `stroke="${escapeXml(s.color)}" stroke-width="2"${dash}/>`,
    );
    if (s.kind !== "floor") {
      out.push(`<circle cx="${n(lx + 13)}" cy="${y}" r="3" fill="${escapeXml(s.color)}"/>`);
    }
    out.push(`<text x="${n(lx + 34)}" y="${y + 4}">${escapeXml(s.name)}</text>`);
  });
  if (all.length === 0) {
    out.push(
      `<text x="${n(margin.left + plotW / 2)}" y="${n(yMid)}" text-anchor="middle" ` +
        `fill="#888888">no data</text>`,
    );
  }
  out.push(`</g>`);
  out.push(`</svg>`);
  return out.join("\n") + "\n";
}
