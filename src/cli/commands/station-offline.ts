// The offline factory station's commands (no network, no database): station init, sign, export,
// status. The online side (station create / install / import) lives elsewhere.

import { createHash } from 'node:crypto';
import { mkdir, readFile, readdir, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { HallmarkError } from '../../errors.js';
import { encodePem } from '../../pki/pem.js';
import { Station, exportJournal, initStation, splitCsrs, stationStatus, writeFileDurably, type CsrInput, type SignOutcome, type StationStatus } from '../../station/station.js';
import { UsageError, flag, info, list, out, readPassphrase, required, str, type Command, type ParsedArgs } from '../io.js';

const PIN_HELP = `The token PIN comes from --pin-file FILE, then HALLMARK_PKCS11_PIN, then a terminal prompt.
--module PATH names the PKCS#11 library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so; a YubiKey:
libykcs11.so); default HALLMARK_PKCS11_MODULE, or what station init recorded.`;

/** Largest CSR file read (a file may hold many concatenated PEM CSRs). */
const MAX_CSR_FILE = 64 * 1024 * 1024;

async function readPin(args: ParsedArgs, stdinBusy = false): Promise<string> {
  const file = str(args, 'pin-file');
  if (file) {
    try {
      return (await readFile(file, 'utf8')).replace(/\r?\n$/, '');
    } catch (err) {
      throw new HallmarkError('PASSPHRASE_REQUIRED', `cannot read the PIN file ${file}: ${(err as NodeJS.ErrnoException).code}`);
    }
  }
  if (process.env.HALLMARK_PKCS11_PIN) return process.env.HALLMARK_PKCS11_PIN;
  if (stdinBusy || !process.stdin.isTTY || !process.stderr.isTTY) {
    throw new HallmarkError('PASSPHRASE_REQUIRED', 'the token PIN is needed: give --pin-file FILE or set HALLMARK_PKCS11_PIN');
  }
  return readPassphrase(args, { fileOption: 'pin-file', envVar: 'HALLMARK_PKCS11_PIN', prompt: 'Token PIN: ' });
}

function describe(s: StationStatus): string {
  const devices = s.registeredDevices === null ? 'any device key (UDID = SHA-256 of the key)' : `${s.registeredDevices} registered device keys`;
  const checkpoint = s.lastCheckpoint ? `last checkpoint at seq ${s.lastCheckpoint.seq} (${s.lastCheckpoint.at})` : 'no checkpoint yet';
  return `Station ${s.stationId}: batch ${s.batch}, line ${s.line}, product ${s.product}, ${s.org}
  quota:        ${s.quota} devices: ${s.issued} signed, ${s.left} left${s.left === 0 ? '  (QUOTA USED UP)' : ''}
  valid until:  ${s.validUntil}${s.signsUntil !== new Date(s.validUntil).toISOString() ? ` (station certificate ends ${s.signsUntil})` : ''}${s.expired ? '  (EXPIRED: signs nothing more)' : ''}
  devices:      ${devices}
  package:      ${s.manifestBound ? 'station.json signed off by the root (its digest is in station.pem)' : 'station.json NOT bound to station.pem (a package made before Hallmark bound them: ask HQ for a new one)'}
  journal:      ${s.journalBytes} bytes; ${checkpoint}; ${s.unsigned} issuance(s) after it${s.unsigned ? ' (hallmark station export signs them)' : ''}
  token key:    ${s.keyUri}
  module:       ${s.module}`;
}

export const stationInitCommand: Command = {
  name: 'station init',
  summary: 'offline station: check a station package and the token key, start the journal',
  usage: `Usage: hallmark station init PACKAGE --dir STATIONDIR [--key pkcs11:URI] [--pin-file F] [--module PATH]

PACKAGE is the directory HQ prepared (station.json, station.pem, chain.pem). Checks every field of it,
that station.pem chains to chain.pem's root with pathLen 0 and name constraints, that it is valid now,
and that the token holds station.pem's key (a test signature with the PIN). Only then copies the
package into STATIONDIR and starts the journal (STATIONDIR/journal.jsonl). --key defaults to the
package's keyUri. The PIN is never stored.
${PIN_HELP}`,
  allowPositionals: true,
  options: { dir: { type: 'string' }, key: { type: 'string' }, 'pin-file': { type: 'string' }, module: { type: 'string' } },
  async run(args) {
    if (args.positionals.length !== 1) throw new UsageError(`give exactly one PACKAGE directory\n\n${this.usage}`);
    const dir = required(args, 'dir', this.usage);
    const pin = await readPin(args);
    const s = await initStation({ dir, packageDir: args.positionals[0]!, keyUri: str(args, 'key'), pin, module: str(args, 'module') });
    out(`Initialised station ${s.stationId} in ${resolve(dir)}\n${describe(s)}`);
    info(`Next: hallmark station sign --dir ${dir} --csr-dir CSRS --out CERTS`);
    return 0;
  },
};

async function csrFilesIn(dir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    throw new HallmarkError('BAD_REQUEST', `cannot read the CSR directory ${dir}: ${(err as NodeJS.ErrnoException).code}`);
  }
  const files: string[] = [];
  for (const n of names.sort()) {
    if (n.startsWith('.')) continue;
    const p = join(dir, n);
    if ((await stat(p)).isFile()) files.push(p);
  }
  return files;
}

async function readCsrFile(path: string): Promise<CsrInput[]> {
  let s;
  try { s = await stat(path); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read it (${(err as NodeJS.ErrnoException).code})`); }
  if (s.size > MAX_CSR_FILE) throw new HallmarkError('INPUT_TOO_LARGE', `it is over the ${MAX_CSR_FILE}-byte limit`);
  return splitCsrs(await readFile(path), path);
}

/** Complete PEM blocks at the start of `text`, and what is left after the last complete one. */
function takePemBlocks(text: string): { blocks: string[]; rest: string } {
  const re = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----\r?\n?/g;
  const blocks: string[] = [];
  let last = 0;
  for (const m of text.matchAll(re)) {
    blocks.push(m[0]);
    last = m.index! + m[0].length;
  }
  return { blocks, rest: text.slice(last) };
}

export const stationSignCommand: Command = {
  name: 'station sign',
  summary: 'offline station: sign device CSRs under the quota, journal each certificate before writing it',
  usage: `Usage: hallmark station sign --dir STATIONDIR (--csr FILE... | --csr-dir DIR | -) [--out DIR|-] [--resend]
                             [--pin-file F] [--module PATH]

Signs CSRs made on the devices: a file (one PEM or several concatenated, or one DER), every file of a
directory, or standard input with "-" (a flashing jig: each CSR is signed as soon as its PEM block is
complete). Only P-256, P-384 and Ed25519 keys are signed. The certificate's subject is the package's
device subject base plus CN=<UDID>, never what the CSR asks; with a device list in the package only
registered keys are signed, each once. A bad CSR is refused with a message and the next one goes on.
Each certificate is written only after its journal line is on disk: --out DIR gets <UDID>.pem (the
device certificate, then station.pem and the chain up to the root, root excluded); --out - (default)
prints them. One line per device on stdout (stderr with --out -). --resend writes the journalled
certificate again for a key signed before (after an interrupted run), without a new issuance.
A checkpoint signed by the token ends the run. Exit status 1 when any CSR was refused.
${PIN_HELP}`,
  allowPositionals: true,
  options: {
    dir: { type: 'string' }, csr: { type: 'string', multiple: true }, 'csr-dir': { type: 'string' }, out: { type: 'string' },
    resend: { type: 'boolean' }, 'pin-file': { type: 'string' }, module: { type: 'string' },
  },
  async run(args) {
    const dir = required(args, 'dir', this.usage);
    const csrFiles = list(args, 'csr');
    const csrDir = str(args, 'csr-dir');
    const fromStdin = args.positionals.length === 1 && args.positionals[0] === '-' || (csrFiles.length === 1 && csrFiles[0] === '-');
    if (args.positionals.some((p) => p !== '-') || args.positionals.length > 1) throw new UsageError(`unexpected argument ${args.positionals.find((p) => p !== '-') ?? '-'}\n\n${this.usage}`);
    const sources = (csrFiles.length && !fromStdin ? 1 : 0) + (csrDir ? 1 : 0) + (fromStdin ? 1 : 0);
    if (sources !== 1) throw new UsageError(`give one of --csr FILE, --csr-dir DIR or - (standard input)\n\n${this.usage}`);
    const outDir = str(args, 'out') ?? '-';
    const toStdout = outDir === '-';
    if (!toStdout) await mkdir(outDir, { recursive: true });

    const pin = await readPin(args, fromStdin);
    const station = await Station.open({ dir, pin, module: str(args, 'module') });
    let signed = 0;
    let refused = 0;
    const chainPem = station.chainDer.map((c) => encodePem('CERTIFICATE', c)).join('');
    const report = toStdout ? info : out;
    const onDurable = async (outcomes: readonly SignOutcome[]): Promise<void> => {
      for (const o of outcomes) {
        if (!o.ok) {
          refused++;
          info(`refused ${o.source}: ${o.error.message} [${o.error.code}]`);
          continue;
        }
        signed++;
        const pem = encodePem('CERTIFICATE', o.certificate) + chainPem;
        if (toStdout) {
          process.stdout.write(pem);
          report(`${o.resent ? 'resent' : 'signed'} ${o.udid} seq ${o.seq}${o.serialNumber ? ` serial ${o.serialNumber}` : ''} (${o.source})`);
        } else {
          const file = join(outDir, `${o.udid}.pem`);
          await writeFileDurably(file, pem, { sync: false });
          report(`${o.resent ? 'resent' : 'signed'} ${o.udid} seq ${o.seq}${o.serialNumber ? ` serial ${o.serialNumber}` : ''} (${o.source}) -> ${file}`);
        }
      }
    };
    try {
      if (station.repairedBytes > 0) info(`note: the journal ended with an incomplete line (an interrupted run): ${station.repairedBytes} bytes cut off; its certificate was never handed out`);
      const options = { onDurable, resend: flag(args, 'resend') };
      if (fromStdin) {
        await signStdin(station, options);
      } else {
        const files = csrDir ? await csrFilesIn(csrDir) : csrFiles;
        // Read and sign in slices so that memory stays flat for large directories.
        const SLICE = 4096;
        for (let i = 0; i < files.length; i += SLICE) {
          const inputs: CsrInput[] = [];
          for (const f of files.slice(i, i + SLICE)) {
            try {
              inputs.push(...await readCsrFile(f));
            } catch (err) {
              const e = err as HallmarkError;
              refused++;
              info(`refused ${f}: ${e.message} [${e.code ?? 'BAD_REQUEST'}]`);
            }
          }
          await station.sign(inputs, options);
        }
      }
    } finally {
      await station.close();
    }
    const s = station.status();
    info(`${signed} signed, ${refused} refused; quota ${s.issued}/${s.quota} used, ${s.left} left`);
    return refused > 0 ? 1 : 0;
  },
};

/** Signs PEM CSRs from standard input as their blocks complete (DER input: read whole, one CSR). */
async function signStdin(station: Station, options: { onDurable: (o: readonly SignOutcome[]) => Promise<void>; resend: boolean }): Promise<void> {
  let text = '';
  let der: Buffer[] | null = null;
  let queue: CsrInput[] = [];
  let n = 0;
  let running: Promise<void> = Promise.resolve();
  let failure: unknown = null;
  const pump = (): void => {
    running = running.then(async () => {
      while (queue.length > 0 && failure === null) {
        const batch = queue;
        queue = [];
        await station.sign(batch, options);
      }
    }).catch((err: unknown) => { failure ??= err; });
  };
  await new Promise<void>((resolveEnd, rejectEnd) => {
    process.stdin.on('data', (chunk: Buffer) => {
      if (der || (text === '' && chunk[0] === 0x30)) { (der ??= []).push(chunk); return; }
      text += chunk.toString('utf8');
      if (text.length > MAX_CSR_FILE) { rejectEnd(new HallmarkError('INPUT_TOO_LARGE', 'standard input holds an incomplete PEM block over the size limit')); return; }
      const { blocks, rest } = takePemBlocks(text);
      text = rest;
      if (blocks.length) {
        for (const b of blocks) queue.push({ source: `stdin#${++n}`, data: b });
        pump();
      }
    });
    process.stdin.on('end', () => resolveEnd());
    process.stdin.on('error', rejectEnd);
  });
  if (der) queue.push({ source: 'stdin', data: Buffer.concat(der) });
  else if (text.trim() !== '') queue.push({ source: `stdin#${++n}`, data: text });
  pump();
  await running;
  if (failure !== null) throw failure;
}

export const stationExportCommand: Command = {
  name: 'station export',
  summary: 'offline station: sign a checkpoint and copy the journal for HQ (hallmark station import)',
  usage: `Usage: hallmark station export --dir STATIONDIR --out JOURNAL [--pin-file F] [--module PATH]

When issuances follow the journal's last checkpoint, signs a checkpoint with the token first (the PIN
is needed then). Copies the journal to JOURNAL and checks the copy as HQ will. Carry JOURNAL to HQ:
hallmark station import JOURNAL. The station keeps its journal; export again at any time.
${PIN_HELP}`,
  options: { dir: { type: 'string' }, out: { type: 'string' }, 'pin-file': { type: 'string' }, module: { type: 'string' } },
  async run(args) {
    const dir = required(args, 'dir', this.usage);
    const target = required(args, 'out', this.usage);
    const before = await stationStatus(dir);
    const needsPin = !before.lastCheckpoint || before.unsigned > 0;
    const pin = needsPin ? await readPin(args) : undefined;
    const r = await exportJournal({ dir, out: target, pin, module: str(args, 'module') });
    const v = r.verification;
    const digest = createHash('sha256').update(await readFile(target)).digest('hex');
    out(`Exported the journal of station ${before.stationId} (batch ${before.batch}) -> ${target}
  issuances:   ${v.entries.length} (${v.issueLines} lines), quota ${before.quota}
  checkpoint:  seq ${v.lastCheckpoint?.seq ?? '-'} at ${v.lastCheckpoint?.at ?? '-'}${r.checkpointWritten ? ' (signed now)' : ''}
  size:        ${r.bytes} bytes, SHA-256 ${digest}`);
    if (v.problems.length) {
      for (const p of v.problems.slice(0, 20)) info(`problem: ${p.kind} seq ${p.seq}: ${p.message}`);
      if (v.problems.length > 20) info(`... and ${v.problems.length - 20} more problems`);
      return 1;
    }
    return 0;
  },
};

export const stationStatusCommand: Command = {
  name: 'station status',
  summary: 'offline station: quota used and left, validity, journal and checkpoint state',
  usage: `Usage: hallmark station status --dir STATIONDIR [--json]

Reads the station's package and journal; needs no PIN and changes nothing.`,
  options: { dir: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const s = await stationStatus(required(args, 'dir', this.usage));
    out(flag(args, 'json') ? JSON.stringify(s, null, 2) : describe(s));
    return 0;
  },
};

export const STATION_OFFLINE_COMMANDS: readonly Command[] = [stationInitCommand, stationSignCommand, stationExportCommand, stationStatusCommand];
