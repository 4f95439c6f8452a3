// Manifest import: a chipmaker's signed device list into one batch, all or nothing.
//
//   1. The batch exists and is open; the format is known (given, or detected from the first byte).
//   2. Generic lists: the detached signature is verified over the whole file before any of it is parsed.
//   3. One write transaction (Registry.registerDeviceStream) is opened, and one streaming pass verifies
//      every entry in it (Microchip: each JWS signature; all: keys are valid points, UDIDs match or are
//      well-formed, birth certificates chain to a trusted vendor CA). Verified entries are staged in
//      chunks in a temporary table of that transaction, not kept in memory: memory stays flat whatever
//      the file's size.
//   4. At the end of the file, in the same transaction: no UDID or key twice in the file; clones
//      against the stored devices refuse the import (audited by the registry after the rollback);
//      new devices are inserted and each audited (source "manifest.import"), then one summary audit
//      entry records the file's SHA-256, format, signer and counts.
// A failed import stores no device (the transaction rolls back). Importing the same file again changes
// nothing: every device comes back "unchanged" and no audit entry is written.

import { createHash } from 'node:crypto';
import { open, readFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import type { Store } from '../../store/database.js';
import type { Transaction } from 'kysely';
import type { Database } from '../../store/schema.js';
import { verifyBirthCertificate } from '../birth-certificates.js';
import { Registry, type StagedRegistration } from '../registry.js';
import type { BirthCheck, ParsedEntry } from './entries.js';
import { microchipEntries } from './microchip.js';
import { csvEntries, decodeSignatureFile, fileChunks, lines, ndjsonEntries, verifyDetachedSignature } from './signed-list.js';
import { summariseSigner, type ManifestSigner, type SignerSummary } from './signers.js';

export const MANIFEST_FORMATS = ['microchip', 'csv', 'ndjson'] as const;
export type ManifestFormat = (typeof MANIFEST_FORMATS)[number];

export interface ImportOptions {
  readonly file: string;
  readonly batch: string;
  /** The --trust signers; at least one. */
  readonly signers: readonly ManifestSigner[];
  /** Detected from the content when not given. */
  readonly format?: ManifestFormat;
  /** Detached signature of a CSV / NDJSON list; default `${file}.sig`. */
  readonly signatureFile?: string;
  /** Report invalid entries and import the others (default: the first invalid entry refuses the import). */
  readonly skipInvalid?: boolean;
  /** Register keys only: do not read, verify or store birth certificates (Microchip x5c, birth_cert columns). */
  readonly ignoreBirthCertificates?: boolean;
  readonly actor: string;
  /** Called for each invalid entry as it is found (with skipInvalid). */
  readonly onInvalid?: (entry: InvalidEntry) => void;
}

export interface InvalidEntry { readonly where: string; readonly udid?: string; readonly reason: string; readonly code: 'MANIFEST_INVALID' | 'BIRTH_CERT_INVALID' }

export interface ImportReport {
  readonly file: string;
  readonly fileSha256: string;
  readonly format: ManifestFormat;
  readonly batch: string;
  /** Signers that verified at least one entry (Microchip) or the file (lists). */
  readonly signers: readonly SignerSummary[];
  readonly entries: number;
  readonly registered: number;
  readonly unchanged: number;
  readonly reRegistered: number;
  readonly invalidSkipped: number;
  readonly invalid: readonly InvalidEntry[];
  readonly warnings: readonly string[];
}

/** Verified entries handed to the registry at a time. */
const STAGE_CHUNK = 1000;

/** How many invalid entries the summary audit entry lists (the count is always complete). */
const AUDITED_INVALID = 100;

/** Picks the format from the first byte that is not whitespace: "[" Microchip, "{" NDJSON, else CSV. */
export async function detectFormat(file: string): Promise<ManifestFormat> {
  let fh;
  try { fh = await open(file, 'r'); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`); }
  try {
    const buf = Buffer.alloc(64 * 1024);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    let i = bytesRead >= 3 && buf[0] === 0xef && buf[1] === 0xbb && buf[2] === 0xbf ? 3 : 0;
    while (i < bytesRead && [0x20, 0x09, 0x0a, 0x0d].includes(buf[i]!)) i++;
    if (i >= bytesRead) throw new HallmarkError('MANIFEST_INVALID', `${file} is empty`);
    if (buf[i] === 0x5b) return 'microchip';
    if (buf[i] === 0x7b) return 'ndjson';
    return 'csv';
  } finally {
    await fh.close();
  }
}

async function* hashed(chunks: AsyncIterable<Buffer>, hash: ReturnType<typeof createHash>): AsyncGenerator<Buffer> {
  for await (const c of chunks) { hash.update(c); yield c; }
}

/** Sorts invalid entries by their place in the file: duplicates are only found once the whole file has been read. */
function inFileOrder(invalid: InvalidEntry[]): void {
  const place = (e: InvalidEntry): number => Number(/^(?:entry|line) (\d+)/.exec(e.where)?.[1] ?? Infinity);
  invalid.sort((a, b) => place(a) - place(b));
}

function label(format: ManifestFormat, position: number, udid: string): string {
  return format === 'microchip' ? `entry ${position} (uniqueId ${udid})` : `line ${position} (udid ${udid})`;
}

export async function importManifest(store: Store, options: ImportOptions): Promise<ImportReport> {
  if (options.signers.length === 0) throw new HallmarkError('BAD_REQUEST', 'name the manifest signer: give its certificate (or, for CSV/NDJSON lists, its public key) with --trust');
  const warnings: string[] = [];
  const now = new Date();

  // Birth certificates are verified in the pass, inside the import's transaction (so that an entry is
  // named, and skippable); the registry then stores them as verified.
  let birthHandle: Transaction<Database> | undefined;
  const checkBirth: BirthCheck = async (certificate, chain, spki) => {
    if (!birthHandle) throw new Error('a birth certificate was checked outside the import transaction');
    await verifyBirthCertificate(birthHandle, certificate, spki, now, chain);
  };
  const registry = new Registry(store);

  const batch = await registry.batch(options.batch);
  if (batch.expiresAt && new Date(batch.expiresAt) <= now) throw new HallmarkError('BATCH_EXPIRED', `batch ${batch.id} expired at ${batch.expiresAt}`);

  const format = options.format ?? (await detectFormat(options.file));
  const usedSigners: ManifestSigner[] = [];
  let listSha256: string | undefined;
  let entries: AsyncIterable<ParsedEntry>;
  const hash = createHash('sha256');
  const ignoreBirthCertificates = options.ignoreBirthCertificates ?? false;

  if (format === 'microchip') {
    if (options.signatureFile) throw new HallmarkError('BAD_REQUEST', 'a Microchip manifest is signed entry by entry: --signature is for CSV and NDJSON lists');
    const signers = options.signers.filter((s) => s.certificate);
    if (signers.length === 0) throw new HallmarkError('BAD_REQUEST', 'a Microchip manifest names its signer by certificate (x5t#S256, kid): give the signer certificate with --trust, not a bare public key');
    entries = microchipEntries(hashed(fileChunks(options.file), hash), {
      signers, ignoreBirthCertificates, checkBirth,
      onSigner: (s) => {
        usedSigners.push(s);
        const c = s.certificate!;
        if (now > c.notAfter) warnings.push(`signer ${s.name} expired on ${c.notAfter.toISOString()}; accepted because it was named with --trust (manifests are signed once and imported later)`);
        if (now < c.notBefore) warnings.push(`signer ${s.name} is not valid before ${c.notBefore.toISOString()}; accepted because it was named with --trust`);
      },
    });
  } else {
    const sigFile = options.signatureFile ?? `${options.file}.sig`;
    let sigBytes: Buffer;
    try { sigBytes = await readFile(sigFile); } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new HallmarkError('MANIFEST_INVALID', code === 'ENOENT'
        ? `no signature: ${sigFile} does not exist (a ${format.toUpperCase()} list needs a detached signature; give it with --signature, or make it with hallmark manifest sign)`
        : `cannot read the signature ${sigFile}: ${code ?? (err as Error).message}`);
    }
    // The whole-file signature is checked before a single line is parsed.
    const checked = await verifyDetachedSignature(options.file, decodeSignatureFile(sigBytes, sigFile), options.signers);
    listSha256 = checked.sha256;
    usedSigners.push(checked.signer);
    const c = checked.signer.certificate;
    if (c && now > c.notAfter) warnings.push(`signer ${checked.signer.name} expired on ${c.notAfter.toISOString()}; accepted because it was named with --trust`);
    const source = lines(hashed(fileChunks(options.file), hash));
    entries = format === 'csv' ? csvEntries(source, { ignoreBirthCertificates, checkBirth }) : ndjsonEntries(source, { ignoreBirthCertificates, checkBirth });
  }

  // One pass inside the write transaction: each entry is verified, then staged by the registry in
  // chunks (registerDeviceStream); duplicates, clones and the inserts are decided once the file has been
  // read to its end. A refused entry, a clone, or a changed file rolls everything back.
  const invalid: InvalidEntry[] = [];
  const noun = format === 'microchip' ? 'entry' : 'line';
  let total = 0;
  let valid = 0;
  const refuse = (e: InvalidEntry): void => {
    if (!options.skipInvalid) {
      const hint = e.code === 'BIRTH_CERT_INVALID' && !/not valid at|does not carry/.test(e.reason) ? ' (trust the vendor CA with hallmark vendor add, or register the keys alone with --ignore-birth-certs)' : '';
      throw new HallmarkError(e.code, `${e.where}: ${e.reason}${hint}; nothing was imported (--skip-invalid imports the valid entries and reports the others)`);
    }
    invalid.push(e);
    options.onInvalid?.(e);
  };
  let fileSha256 = '';
  async function* staged(trx: Transaction<Database>): AsyncGenerator<StagedRegistration[]> {
    birthHandle = trx;
    let chunk: StagedRegistration[] = [];
    for await (const entry of entries) {
      total++;
      if (!entry.ok) { refuse({ where: entry.where, udid: entry.udid, reason: entry.reason, code: entry.code }); continue; }
      valid++;
      chunk.push({ position: entry.position, registration: entry.device });
      if (chunk.length >= STAGE_CHUNK) { yield chunk; chunk = []; }
    }
    if (chunk.length > 0) yield chunk;
    fileSha256 = hash.digest('hex');
    if (listSha256 !== undefined && listSha256 !== fileSha256) {
      throw new HallmarkError('MANIFEST_INVALID', 'the file changed while it was being imported (its SHA-256 differs from the signed one); nothing was imported');
    }
    if (total === 0) throw new HallmarkError('MANIFEST_INVALID', `${options.file} has no entries`);
    if (valid === 0) throw new HallmarkError('MANIFEST_INVALID', `no valid entry: all ${total} entries are invalid; nothing was imported`);
  }

  // The summary entry commits in the same transaction as the devices; a re-import that changes
  // nothing writes nothing, not even the summary.
  const counts = await registry.registerDeviceStream(options.batch, staged, {
    actor: options.actor, source: 'manifest.import',
    where: (position, udid) => label(format, position, udid ?? '?'),
    onDuplicate: ({ position, udid, earlier, what }) => {
      refuse({ where: label(format, position, udid), udid, reason: `the same ${what} as ${noun} ${earlier} of this file`, code: 'MANIFEST_INVALID' });
    },
    summary: ({ registered, unchanged, reRegistered }) => {
      inFileOrder(invalid);
      if (registered + reRegistered === 0) return undefined;
      return {
        actor: options.actor, action: 'manifest.import', target: options.batch,
        details: {
          file: options.file, fileSha256, format, signers: usedSigners.map(summariseSigner).map((s) => ({ name: s.name, sha256: s.sha256 })),
          entries: total, registered, unchanged, reRegistered, invalidSkipped: invalid.length,
          birthCertificates: ignoreBirthCertificates ? 'ignored' : 'verified',
          invalid: invalid.slice(0, AUDITED_INVALID).map((e) => `${e.where}: ${e.reason}`),
        },
      };
    },
  }).catch((err: unknown) => {
    // The registry names entries as the file does; say, as for every refusal, that nothing was imported.
    if (err instanceof HallmarkError && /^(entry|line) \d+/.test(err.message) && !err.message.includes('nothing was imported')) {
      throw new HallmarkError(err.code, `${err.message}; nothing was imported`, { cause: err });
    }
    throw err;
  });
  const { registered, unchanged, reRegistered } = counts;
  inFileOrder(invalid);
  const signers = usedSigners.map(summariseSigner);
  const report: ImportReport = {
    file: options.file, fileSha256, format, batch: options.batch, signers, entries: total,
    registered, unchanged, reRegistered, invalidSkipped: invalid.length, invalid, warnings,
  };
  return report;
}
