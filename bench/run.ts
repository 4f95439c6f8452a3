// Runs every bench/*.bench.ts module (compiled to dist/bench/*.bench.js) and prints its figures.
//
//   npm run bench                    human table
//   npm run bench -- --json          one JSON object per line per figure: {name, value, unit, ceiling, ratio}
//   npm run bench -- issuance        only bench/issuance.bench.ts (filter by module name)
//   npm run bench -- est-enrolment   only bench/est-enrolment.bench.ts (its server child is bench/est-server.ts, not a module)

import { readdirSync } from 'node:fs';
import { cpus, platform } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { Figure } from './figure.js';

interface BenchModule { run(): Promise<Figure[]> }

const args = process.argv.slice(2);
const json = args.includes('--json');
const filters = args.filter((a) => !a.startsWith('--'));

const here = dirname(fileURLToPath(import.meta.url));
const modules = readdirSync(here).filter((f) => f.endsWith('.bench.js')).sort()
  .map((f) => ({ name: f.slice(0, -'.bench.js'.length), file: join(here, f) }))
  .filter((m) => filters.length === 0 || filters.some((x) => m.name === x || m.name.includes(x)));

if (modules.length === 0) {
  process.stderr.write(`no benchmark matches ${filters.join(', ')}\n`);
  process.exit(2);
}

const fmt = (n: number | null): string => (n === null ? '-' : n >= 100 ? Math.round(n).toLocaleString('en-US') : n.toFixed(2));

let failed = false;
const all: Figure[] = [];
for (const m of modules) {
  let figures: Figure[];
  try {
    const mod = (await import(pathToFileURL(m.file).href)) as BenchModule;
    figures = await mod.run();
  } catch (err) {
    failed = true;
    process.stderr.write(`benchmark ${m.name} failed: ${(err as Error).stack ?? String(err)}\n`);
    continue;
  }
  for (const f of figures) {
    all.push(f);
    if (json) process.stdout.write(JSON.stringify({ name: f.name, value: f.value, unit: f.unit, ceiling: f.ceiling, ratio: f.ratio }) + '\n');
  }
}

if (!json) {
  const cpu = cpus();
  console.log(`node ${process.version}, ${platform()}, ${cpu.length} × ${cpu[0]?.model ?? 'unknown CPU'}, ${new Date().toISOString().slice(0, 10)}\n`);
  const rows = [['figure', 'value', 'unit', 'ceiling', 'ratio'], ...all.map((f) => [f.name, fmt(f.value), f.unit, fmt(f.ceiling), f.ratio === null ? '-' : f.ratio.toFixed(2)])];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const line = (r: string[]): string => r.map((c, i) => (i === 0 || i === 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  console.log(line(rows[0]!));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows.slice(1)) console.log(line(r));
  const notes = all.filter((f) => f.notes);
  if (notes.length) {
    console.log('');
    for (const f of notes) console.log(`${f.name}: ${f.notes}`);
  }
}
// Exit explicitly: a benchmark that failed half-way may leave a pool or timer behind.
process.exit(failed ? 1 : 0);
