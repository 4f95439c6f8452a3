// hallmark stamp generate | status | flashed — the connected factory's bulk stamps (issue 6).
// (stamp inspect / open / factory-key, the factory side, are in stamp-files.ts.)

import { createPublicKey } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { generateStamps, markFlashed, stampStatus, type StampFormatName, type StampProgress } from '../../authority/stamping.js';
import { HallmarkError } from '../../errors.js';
import { publicKeyFromFile } from '../../pki/public-key.js';
import { withAuthority } from '../context.js';
import { UsageError, actor, flag, info, out, required, str, table, type Command } from '../io.js';

const FORMATS: readonly StampFormatName[] = ['json', 'tlv', 'nvs'];

function parseFormats(text: string | undefined): StampFormatName[] {
  const names = (text ?? 'json').split(',').map((s) => s.trim()).filter(Boolean);
  for (const n of names) if (!FORMATS.includes(n as StampFormatName)) throw new UsageError(`unknown stamp format ${JSON.stringify(n)} (json, tlv, nvs)`);
  return names as StampFormatName[];
}

function parseCount(text: string): number {
  if (!/^\d{1,8}$/.test(text.replace(/_/g, ''))) throw new UsageError('--count must be a whole number');
  return Number(text.replace(/_/g, ''));
}

/** A progress bar with rate and ETA on a terminal; a plain line every few seconds otherwise (CI logs, pipes). */
export function progressReporter(stream: NodeJS.WriteStream = process.stderr): { update(p: StampProgress): void; end(): void } {
  const started = performance.now();
  let firstDone: number | undefined;
  let lastPlain = 0;
  let lastDraw = 0;
  const figures = (p: StampProgress): { rate: number; etaText: string } => {
    const seconds = (performance.now() - started) / 1000;
    const rate = seconds > 0 ? (p.done - (firstDone ?? 0)) / seconds : 0;
    const eta = rate > 0 ? (p.total - p.done) / rate : Infinity;
    const etaText = Number.isFinite(eta) ? `${Math.floor(eta / 60)}m${String(Math.round(eta % 60)).padStart(2, '0')}s` : '--';
    return { rate: Math.round(rate), etaText };
  };
  return {
    update(p) {
      firstDone ??= p.done;
      const now = performance.now();
      const { rate, etaText } = figures(p);
      if (stream.isTTY) {
        if (now - lastDraw < 100 && p.done < p.total) return;
        lastDraw = now;
        const width = 30;
        const filled = p.total > 0 ? Math.round((p.done / p.total) * width) : width;
        stream.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${p.done}/${p.total} ${rate}/s ETA ${etaText}   `);
      } else if (now - lastPlain >= 2000 || p.done === p.total) {
        lastPlain = now;
        stream.write(`stamps: ${p.done}/${p.total} (${rate}/s, ETA ${etaText})\n`);
      }
    },
    end() {
      if (stream.isTTY) stream.write('\n');
    },
  };
}

export const stampGenerateCommand: Command = {
  name: 'stamp generate',
  summary: 'make N device stamps for a batch (keys, certificates, onboarding secrets) and write them for the factory',
  usage: `Usage: hallmark stamp generate --batch ID --count N --out DIR [--format json,tlv,nvs] [--encrypt-to FACTORY.pem] [--json] [--home DIR]

Makes N devices under the batch's quota: for each, a P-256 key pair made by the authority, its
operational certificate with the chain, a serial number, an X25519 onboarding key and a
proof-of-possession secret for app-based onboarding, and the QR payload. Every device is registered
and every certificate recorded before any file is written. The product must allow authority-made
keys (hallmark product create --allow-server-keygen).

Formats (one file per device and format; docs/stamp-formats.md):
  json   <serial>.json                 plus stamps-<run>.csv (serial, UDID, certificate fingerprint)
  tlv    <serial>.tlv.bin              a binary stamp partition image (hallmark stamp inspect FILE)
  nvs    <serial>.nvs.csv              the ESP-IDF NVS partition generator CSV
--encrypt-to FACTORY.pem: one archive, stamps-<run>-<part>.hsa, encrypted to the factory's public key
(HPKE, RFC 9180) and signed by the issuing CA; private keys never touch the disk in clear. The factory
opens it with hallmark stamp open.

Interrupted (Ctrl-C, kill -9, power)? Run the same command again: it finishes the run, rewriting the
stamps whose files were not yet known to be on disk (their secrets stay encrypted in the store until
the run's files are flushed to disk at its end). Progress goes to stderr.`,
  options: { batch: { type: 'string' }, count: { type: 'string' }, out: { type: 'string' }, format: { type: 'string' }, 'encrypt-to': { type: 'string' }, json: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const batch = required(args, 'batch', this.usage);
    const count = parseCount(required(args, 'count', this.usage));
    const outDir = required(args, 'out', this.usage);
    const formats = parseFormats(str(args, 'format'));
    const encryptToFile = str(args, 'encrypt-to');
    let encryptTo: Buffer | undefined;
    if (encryptToFile) {
      let content: Buffer;
      try { content = await readFile(encryptToFile); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${encryptToFile}`); }
      encryptTo = publicKeyFromFile(content);
      const key = createPublicKey({ key: encryptTo, format: 'der', type: 'spki' });
      if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') throw new HallmarkError('UNSUPPORTED_ALGORITHM', 'the factory key must be a P-256 public key (hallmark stamp factory-key makes one)');
    }
    return withAuthority(args, async (authority) => {
      const progress = progressReporter();
      let report;
      try {
        report = await generateStamps(authority, { batch, count, outDir, formats, encryptTo, actor: actor(), onProgress: (p) => progress.update(p) });
      } finally {
        progress.end();
      }
      if (flag(args, 'json')) out(JSON.stringify(report, null, 2));
      else {
        out(`${report.resumed ? 'Finished' : 'Made'} stamp run ${report.runId} for batch ${report.batch}: ${report.requested} devices` +
          `${!report.resumed ? '' : report.archive && report.rewritten + report.generated === 0 ? ' (the interrupted invocation had completed its archive)' : ` (${report.rewritten} rewritten from the interrupted run, ${report.generated} new)`} in ${report.seconds.toFixed(1)} s`);
        out(`Files:   ${report.archive ?? report.outDir}`);
        out(`Summary: ${report.summaryCsv}`);
      }
      return 0;
    });
  },
};

export const stampStatusCommand: Command = {
  name: 'stamp status',
  summary: "a batch's stamps: how many made, written, flashed (reported by the factory) and enrolled",
  usage: 'Usage: hallmark stamp status --batch ID [--json] [--home DIR]',
  options: { batch: { type: 'string' }, json: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const batch = required(args, 'batch', this.usage);
    return withAuthority(args, async (authority) => {
      const s = await stampStatus(authority, batch);
      if (flag(args, 'json')) { out(JSON.stringify(s, null, 2)); return 0; }
      out(`Batch ${s.batch}: quota ${s.quota}, identities issued ${s.issued}`);
      out(`  stamped ${s.stamped}, written ${s.written}, flashed ${s.flashed}, enrolled ${s.enrolled}`);
      const state = (r: (typeof s.runs)[number]): string => r.status !== 'running' ? r.status : r.madeBy ? `running (pid ${r.madeBy.pid} on ${r.madeBy.host})` : 'interrupted (run the same command again)';
      if (s.runs.length) out(table(['RUN', 'STATUS', 'STAMPS', 'OUT', 'STARTED'], s.runs.map((r) => [r.id, state(r), String(r.requested), r.outDir, r.createdAt])));
      return 0;
    });
  },
};

export const stampFlashedCommand: Command = {
  name: 'stamp flashed',
  summary: 'record which stamps the factory flashed (serial numbers or UDIDs, one per line)',
  usage: `Usage: hallmark stamp flashed --batch ID FILE|- [--json] [--home DIR]

FILE lists the serial numbers (or UDIDs) the flashing station reports, one per line; the first CSV
column is taken, so a flashing log or the run's summary CSV works too. Unknown entries are listed and
not recorded.`,
  options: { batch: { type: 'string' }, json: { type: 'boolean' }, 'passphrase-file': { type: 'string' } },
  allowPositionals: true,
  async run(args) {
    const batch = required(args, 'batch', this.usage);
    const file = args.positionals[0];
    if (!file) throw new UsageError(`a file of serial numbers is required\n\n${this.usage}`);
    let text: string;
    try { text = file === '-' ? await readStdin() : await readFile(file, 'utf8'); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}`); }
    if (text.length > 256 * 1024 * 1024) throw new HallmarkError('INPUT_TOO_LARGE', 'the list is larger than 256 MiB');
    const ids = text.split(/\r?\n/).map((l) => l.split(',')[0]!.replace(/^"|"$/g, '').trim()).filter((l) => l && !/^serial/i.test(l));
    return withAuthority(args, async (authority) => {
      const r = await markFlashed(authority, batch, ids, actor());
      if (flag(args, 'json')) out(JSON.stringify(r, null, 2));
      else {
        out(`Recorded ${r.marked} flashed stamp(s) for batch ${batch}${r.already ? ` (${r.already} already recorded)` : ''}`);
        if (r.unknown.length) info(`${r.unknown.length} unknown: ${r.unknown.slice(0, 20).join(', ')}${r.unknown.length > 20 ? ', …' : ''}`);
      }
      return r.unknown.length ? 1 : 0;
    });
  },
};

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of process.stdin) {
    size += (c as Buffer).length;
    if (size > 256 * 1024 * 1024) throw new HallmarkError('INPUT_TOO_LARGE', 'the list is larger than 256 MiB');
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks).toString('utf8');
}
