// The SVG writer: well-formed XML, every series drawn, log axes, escaping. No GPU needed.
import assert from "node:assert/strict";
import { escapeXml, type LatencySeries, renderLatencySvg } from "../src/plot.ts";
import { type BatchResult, latencySeries } from "../src/tune.ts";

/**
 * A tiny well-formedness check: tags balance and nest, attributes are quoted, nothing but
 * entities follows an `&`. Returns the element names in document order.
 */
function checkWellFormed(svg: string): string[] {
  const names: string[] = [];
  const stack: string[] = [];
  const tag = /<(\/?)([A-Za-z_][\w:.-]*)((?:\s+[\w:.-]+="[^"<]*")*)\s*(\/?)>|<\?xml[^>]*\?>/g;
  let last = 0;
  for (const m of svg.matchAll(tag)) {
    const text = svg.slice(last, m.index);
    assert.ok(!/[<>]/.test(text), `stray < or > in text: ${JSON.stringify(text.slice(0, 80))}`);
    assert.ok(
      !/&(?!(amp|lt|gt|quot|#\d+);)/.test(text),
      `bare & in text: ${JSON.stringify(text.slice(0, 80))}`,
    );
    last = m.index! + m[0].length;
    if (m[0].startsWith("<?xml")) continue;
    const [, closing, name, attrs, selfClosing] = m;
    assert.ok(!/&(?!(amp|lt|gt|quot|#\d+);)/.test(attrs), `bare & in attributes of <${name}>`);
    if (closing) {
      assert.equal(stack.pop(), name, `</${name}> closes the wrong element`);
    } else {
      names.push(name);
      if (!selfClosing) stack.push(name);
    }
  }
  assert.ok(!/[<>]/.test(svg.slice(last)), "unparsed markup at the end");
  assert.deepEqual(stack, [], "unclosed elements");
  assert.equal(names[0], "svg", "the root element is <svg>");
  return names;
}

const M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192];
const SERIES: LatencySeries[] = [
  { name: "tuned config", points: M.map((m) => ({ batchSize: m, us: 20 + m * 0.1 })) },
  { name: "default config", points: M.map((m) => ({ batchSize: m, us: 24 + m * 0.12 })) },
  { name: "unfused baseline", points: M.map((m) => ({ batchSize: m, us: 300 + m * 4 })) },
  {
    name: "memory floor",
    kind: "floor",
    points: M.map((m) => ({ batchSize: m, us: 9 + m * 0.03 })),
  },
];

Deno.test("renderLatencySvg: well-formed, the four series, legend, axes", () => {
  const svg = renderLatencySvg(SERIES, { title: "E=257 N=256 K=7168", subtitle: "H100 & co" });
  const names = checkWellFormed(svg);
  for (const s of SERIES) {
    assert.ok(svg.includes(`data-series="${s.name}"`), `series ${s.name} is drawn`);
    assert.ok(svg.includes(`>${s.name}</text>`), `series ${s.name} is in the legend`);
  }
  assert.equal(names.filter((n) => n === "polyline").length, 4);
  // Markers on the three measured series, none on the floor.
  assert.equal(names.filter((n) => n === "circle").length, 3 * M.length + 3);
  assert.ok(svg.includes(`stroke-dasharray="6 4"`), "the floor is dashed");
  assert.ok(svg.includes("H100 &amp; co"), "text is escaped");
  assert.ok(svg.includes("batch size (tokens)") && svg.includes("latency (µs)"));
  // x ticks: powers of two, labelled; y ticks: 1-2-5 decades.
  for (const t of [">1<", ">64<", ">8192<"]) assert.ok(svg.includes(t), `x tick ${t}`);
  for (const t of [">10<", ">100<", ">1k<"]) assert.ok(svg.includes(t), `y tick ${t}`);
  assert.ok(!/NaN|Infinity|undefined/.test(svg), "no NaN, Infinity or undefined in the output");
});

Deno.test("renderLatencySvg: log scales place points monotonically", () => {
  const svg = renderLatencySvg([SERIES[0]]);
  const circles = [...svg.matchAll(/<circle cx="([\d.]+)" cy="([\d.]+)"/g)]
    .map((m) => [Number(m[1]), Number(m[2])]);
  const points = circles.slice(0, M.length);
  const dx = points.slice(1).map((p, i) => p[0] - points[i][0]);
  // Equal steps in log2(M): equal steps in x.
  for (const d of dx) assert.ok(Math.abs(d - dx[0]) < 0.2, `x steps ${dx.join(", ")}`);
  // Larger µs is higher on the page (smaller y).
  for (let i = 1; i < points.length; i++) assert.ok(points[i][1] < points[i - 1][1]);
});

Deno.test("renderLatencySvg: empty, one point, missing values", () => {
  checkWellFormed(renderLatencySvg([]));
  const one = renderLatencySvg([{ name: "a", points: [{ batchSize: 8, us: 12 }] }]);
  checkWellFormed(one);
  assert.ok(!/NaN|Infinity/.test(one));
  const holes = renderLatencySvg([{
    name: "b<c>",
    points: [{ batchSize: 1, us: NaN }, { batchSize: 2, us: 0 }, { batchSize: 4, us: 5 }],
  }]);
  checkWellFormed(holes);
  assert.ok(holes.includes(`data-series="b&lt;c&gt;"`));
  assert.equal([...holes.matchAll(/<circle /g)].length, 1 + 1); // one point + legend marker
});

Deno.test("escapeXml", () => {
  assert.equal(escapeXml(`a<b>&"c'`), "a&lt;b&gt;&amp;&quot;c&#39;");
});

Deno.test("latencySeries: tuned, default, unfused and floor from tune results", () => {
  const config = { blockM: 16, blockN: 32, warpN: 8, stages: 4 };
  const r = (m: number, unfused?: number): BatchResult => ({
    M: m,
    best: { config, us: 10 + m, samples: 40 },
    fastest: { config, us: 10 + m, samples: 40 },
    default: { config, us: 12 + m, samples: 40 },
    unfusedUs: unfused,
    floorUs: 5 + m,
    floorBytes: 1e6,
    distinctExperts: 9,
    maxTokensPerExpert: m,
    candidates: 20,
    timed: 20,
    cut: 0,
    refused: 0,
    seconds: 0.1,
  });
  const series = latencySeries([r(1, 300), r(8)]);
  assert.deepEqual(series.map((s) => s.name), [
    "tuned config",
    "default config",
    "unfused baseline",
    "memory floor",
  ]);
  assert.equal(series[2].points.length, 1, "a missing unfused time is left out");
  assert.equal(series[3].kind, "floor");
  checkWellFormed(renderLatencySvg(series));
});
