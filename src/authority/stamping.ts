// Factory stamps ("Company B", issue 6): the authority makes N devices for a batch — key pair,
// onboarding key, PoP secret, serial number, operational certificate — registers each device and
// records each certificate, and only then writes the stamp files (or one archive encrypted to the
// factory). Part of the authority core: it signs and it writes devices and certificates.
//
// Durability and resumption. Work goes in chunks. A chunk's devices, certificates, audit entries and
// stamp rows commit in one transaction, the stamp's secrets (device key, onboarding key, PoP secret)
// with them, encrypted under a key derived from the authority's key store (never in clear on disk).
// The files are written after the commit; the secrets are cleared at the end of the run, once the file
// system is flushed (a power cut must not lose the only copy of a key). A kill -9 or power cut at any
// moment leaves either nothing of a chunk or committed stamps whose secrets are still kept; running
// the same command again finds the unfinished run, rewrites those stamps from the stored secrets, and
// carries on. No registered device is ever without its recorded certificate.
//
// Speed. Keys come from DER templates around raw key material (src/pki/raw-keys.ts: OpenSSL's encoders
// cost several times the key generation). Each stage has its own thread: the event loop makes chunks
// (X25519 onboarding keys and certificate signatures on the libuv pool), the SQLite writer thread
// commits them, the stamp file writer thread writes their files; up to IN_FLIGHT chunks overlap. The
// event loop is the critical stage (docs/benchmarks.md): work moved onto it, even if cheaper, slows a run.

import { createCipheriv, createDecipheriv, createHash, createPrivateKey, createPublicKey, randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rename, rm } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { hostname } from 'node:os';
import { appendAudit } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { createArchiveWriter, publishArchive, sha256OfFile } from '../factory/archive.js';
import { flushFileSystem } from '../files.js';
import { formatByName } from '../factory/formats/index.js';
import { StampFileWriter } from '../factory/stamp-file-writer.js';
import { batchSummaryCsvHeader, batchSummaryCsvLine } from '../factory/formats/json.js';
import { STAMP_VERSION, madeByThisAuthority, qrPayloadFor, type Stamp, type StampFormat } from '../factory/stamp.js';
import { sha256Fingerprint } from '../pki/certificate.js';
import { nameToString } from '../pki/names.js';
import { p256KeyPair, x25519KeyPair } from '../pki/raw-keys.js';
import { DEFAULT_TENANT, udidOfKey } from '../registry/registry.js';
import type { Kysely } from 'kysely';
import { nowIso } from '../store/database.js';
import type { Database } from '../store/schema.js';
import { rawSql } from '../store/raw-sql.js';
import type { Authority } from './authority.js';
import { signCertificate, type SigningCa } from './certificate-signer.js';
import { STORE_STAMP_CHUNK, forgetStampSecrets, markStampsWritten } from './stamp-records.js';
import { deviceSubject, deviceUris } from './device-names.js';
import { profileByName } from './profiles.js';

export type StampFormatName = 'json' | 'tlv' | 'nvs';

export interface StampGenerateOptions {
  readonly batch: string;
  readonly count: number;
  readonly outDir: string;
  readonly formats: readonly StampFormatName[];
  /** The factory's public key (SPKI DER): write one archive encrypted to it instead of clear files. */
  readonly encryptTo?: Buffer;
  readonly actor: string;
  /** Devices per transaction (default 256). */
  readonly chunkSize?: number;
  readonly onProgress?: (progress: StampProgress) => void;
}

export interface StampProgress {
  /** Stamps of this run written so far (earlier invocations included). */
  readonly done: number;
  readonly total: number;
}

export interface StampRunReport {
  readonly runId: string;
  readonly batch: string;
  readonly requested: number;
  /** True when an unfinished run was found and carried on. */
  readonly resumed: boolean;
  /** Committed stamps of an earlier, interrupted invocation whose files this one wrote. */
  readonly rewritten: number;
  /** New devices made by this invocation. */
  readonly generated: number;
  readonly outDir: string;
  readonly summaryCsv: string;
  readonly archive?: string;
  readonly seconds: number;
}

const DEFAULT_CHUNK = 1024;
const MAX_COUNT = 10_000_000;
const PENDING_PURPOSE = 'stamp-pending-v1';
/** Chunks made but not yet written, at most (memory: ~3 MB a chunk of 1,024). */
const IN_FLIGHT = 3;

interface StampContext {
  readonly batchId: string;
  readonly quota: number;
  readonly issuedCount: number;
  readonly expiresAt: string | null;
  readonly productId: number;
  readonly productName: string;
  readonly profile: string;
  readonly validityDays: number;
  readonly allowServerKeygen: boolean;
  readonly lineId: number;
  readonly lineName: string;
  readonly caName: string;
}

/** One prepared stamp: made and signed, not yet stored. */
interface Prepared {
  readonly seq: number;
  readonly stamp: Stamp;
  readonly spki: Buffer;
  readonly serialHex: string;
  readonly fingerprint: string;
  readonly subjectText: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
}

export function stampSerialNumber(batchId: string, seq: number): string {
  return `${batchId.replace(/^b-/, '').toUpperCase()}-${String(seq).padStart(6, '0')}`;
}

async function stampContext(authority: Authority, batchId: string): Promise<StampContext> {
  const row = await authority.store.db.selectFrom('batches as b')
    .innerJoin('products as p', 'p.id', 'b.product_id')
    .innerJoin('lines as l', 'l.id', 'b.line_id')
    .innerJoin('certificate_authorities as ca', 'ca.id', 'l.ca_id')
    .select(['b.id', 'b.quota', 'b.issued_count', 'b.expires_at', 'p.id as product_id', 'p.name as product_name', 'p.profile', 'p.validity_days', 'p.allow_server_keygen', 'l.id as line_id', 'l.name as line_name', 'ca.name as ca_name'])
    .where('b.id', '=', batchId).executeTakeFirst();
  if (!row) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${JSON.stringify(batchId)}`);
  return {
    batchId: row.id, quota: Number(row.quota), issuedCount: Number(row.issued_count), expiresAt: row.expires_at, productId: Number(row.product_id), productName: row.product_name,
    profile: row.profile, validityDays: Number(row.validity_days), allowServerKeygen: !!Number(row.allow_server_keygen), lineId: Number(row.line_id), lineName: row.line_name, caName: row.ca_name,
  };
}

// ---------------------------------------------------------------- secrets at rest between commit and files

function sealPending(key: Buffer, udid: string, stamp: Stamp): Buffer {
  const parts = [stamp.devicePrivateKeyPkcs8!, stamp.onboardingPrivateKeyPkcs8!, stamp.popSecret];
  const plain = Buffer.concat(parts.flatMap((p) => { const len = Buffer.alloc(2); len.writeUInt16BE(p.length); return [len, p]; }));
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  cipher.setAAD(Buffer.from(`hallmark-stamp-pending|${udid}`));
  const body = Buffer.concat([cipher.update(plain), cipher.final()]);
  return Buffer.concat([Buffer.from([1]), iv, cipher.getAuthTag(), body]);
}

function openPending(key: Buffer, udid: string, blob: Buffer): { devicePrivateKeyPkcs8: Buffer; onboardingPrivateKeyPkcs8: Buffer; popSecret: Buffer } {
  try {
    if (blob[0] !== 1 || blob.length < 29) throw new Error('unknown version');
    const decipher = createDecipheriv('aes-256-gcm', key, blob.subarray(1, 13));
    decipher.setAAD(Buffer.from(`hallmark-stamp-pending|${udid}`));
    decipher.setAuthTag(blob.subarray(13, 29));
    const plain = Buffer.concat([decipher.update(blob.subarray(29)), decipher.final()]);
    const parts: Buffer[] = [];
    for (let at = 0; at < plain.length;) {
      const len = plain.readUInt16BE(at);
      parts.push(plain.subarray(at + 2, at + 2 + len));
      at += 2 + len;
    }
    if (parts.length !== 3) throw new Error('wrong number of parts');
    return { devicePrivateKeyPkcs8: parts[0]!, onboardingPrivateKeyPkcs8: parts[1]!, popSecret: parts[2]! };
  } catch (err) {
    throw new HallmarkError('STAMP_INVALID', `the stored secrets of stamp ${udid} cannot be opened (was the key store replaced?)`, { cause: err });
  }
}

// ---------------------------------------------------------------- making stamps

interface Maker {
  readonly ctx: StampContext;
  readonly issuer: SigningCa & { readonly chain: readonly Buffer[] };
  readonly org: string;
}

async function makeStamp(maker: Maker, seq: number): Promise<Prepared> {
  const { ctx, issuer } = maker;
  const device = p256KeyPair();
  const onboarding = await x25519KeyPair();
  const popSecret = randomBytes(16);
  const udid = udidOfKey(device.spki);
  const serialNumber = stampSerialNumber(ctx.batchId, seq);
  const profile = profileByName(ctx.profile);
  const subject = deviceSubject({ udid, serialNumber }, ctx.productName, maker.org);
  const signed = await signCertificate(issuer, {
    profile, subject, subjectPublicKeyInfo: device.spki, subjectKeyKind: 'ecdsa-p256', validityDays: ctx.validityDays,
    altNames: profile.subjectAltName === 'none' ? undefined : { uri: deviceUris({ udid, serialNumber }) },
  });
  const onboardingHash = createHash('sha256').update(onboarding.spki).digest().subarray(0, 16);
  const stamp: Stamp = madeByThisAuthority({
    version: STAMP_VERSION, serialNumber, udid, company: maker.org, product: ctx.productName, batch: ctx.batchId,
    devicePrivateKeyPkcs8: device.pkcs8, certificateDer: signed.der, chainDer: issuer.chain, popSecret,
    onboardingPublicKeySpki: onboarding.spki, onboardingPrivateKeyPkcs8: onboarding.pkcs8,
    qrPayload: qrPayloadFor(serialNumber, ctx.productName, popSecret, onboardingHash),
  });
  return {
    seq, stamp, spki: device.spki, serialHex: signed.serialHex, fingerprint: sha256Fingerprint(signed.der), subjectText: nameToString(subject),
    notBefore: signed.parsed.notBefore, notAfter: signed.parsed.notAfter,
  };
}

function prepareChunk(maker: Maker, firstSeq: number, n: number): Promise<Prepared[]> {
  return Promise.all(Array.from({ length: n }, (_, i) => makeStamp(maker, firstSeq + i)));
}

// ---------------------------------------------------------------- storing

/** Commits a chunk (stamp-records.ts): on the SQLite writer thread when one runs, otherwise in this thread. */
function storeChunk(authority: Authority, input: { runId: string; ctx: StampContext; issuerId: number; chunk: readonly Prepared[]; pendingKey: Buffer; actor: string; written: readonly string[] }): Promise<void> {
  const { ctx } = input;
  return authority.store.commit(STORE_STAMP_CHUNK, {
    runId: input.runId, batchId: ctx.batchId, quota: ctx.quota, productId: ctx.productId, lineId: ctx.lineId, lineName: ctx.lineName, caName: ctx.caName,
    issuerId: input.issuerId, profile: ctx.profile, tenant: DEFAULT_TENANT, actor: input.actor, written: input.written,
    rows: input.chunk.map((p) => ({
      seq: p.seq, udid: p.stamp.udid, spki: p.spki, serialNumber: p.stamp.serialNumber, certificateSerial: p.serialHex, subject: p.subjectText, fingerprint: p.fingerprint,
      notBefore: nowIso(p.notBefore), notAfter: nowIso(p.notAfter), der: p.stamp.certificateDer, pending: sealPending(input.pendingKey, p.stamp.udid, p.stamp),
    })),
  });
}

// ---------------------------------------------------------------- writing files

interface Sink {
  write(stamps: readonly Stamp[]): Promise<void>;
}

function fileNames(stamp: Stamp, formats: readonly StampFormat[]): { name: string; format: StampFormat }[] {
  return formats.map((format) => ({ name: `${stamp.serialNumber}${format.extension}`, format }));
}

/** Stamp files on their own writer thread (src/factory/stamp-file-writer.ts), one message per chunk. */
function plainSink(writer: StampFileWriter, formats: readonly StampFormat[]): Sink {
  return {
    write(stamps) {
      return writer.write(stamps.flatMap((stamp) => fileNames(stamp, formats).map((f) => ({ name: f.name, bytes: f.format.encode(stamp) }))));
    },
  };
}

// ---------------------------------------------------------------- the run

interface RunRow { id: string; requested: number; formats: string; out_dir: string; encrypt_to: string | null; archive_name: string | null; archive_sha256: string | null }

/** A run's owner is presumed gone after this long without a chunk committed (another host, or a reused pid). */
const OWNER_STALE_MS = 10 * 60 * 1000;

/** Who makes a run: host, pid and a token of this invocation (two in one process differ by the token). */
function newOwner(): string {
  return `${hostname()} ${process.pid} ${randomBytes(6).toString('hex')}`;
}

/**
 * Whether a run's recorded owner may still be making it: a process of this host that is alive, or a
 * process of another host that committed a chunk recently. A kill -9 frees the run at once on the same
 * host (the pid is gone); a finished or failed invocation clears its owner itself.
 */
function ownerAlive(owner: string | null, heartbeatAt: string | null): boolean {
  if (!owner) return false;
  if (heartbeatAt && Date.now() - new Date(heartbeatAt).getTime() > OWNER_STALE_MS) return false;
  const [host, pidText] = owner.split(' ');
  if (host !== hostname()) return true;
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Finds the batch's unfinished run (to resume) or starts one, and makes this invocation its owner, in
 * one write transaction (the store's write lock orders two invocations that start together). Refuses a
 * run that another live process is making (STAMP_RUN_BUSY) — two makers would collide on sequence
 * numbers and files —, one with other settings (STAMP_RUN_UNFINISHED), and a new one beyond the quota.
 */
async function openRun(authority: Authority, ctx: StampContext, options: StampGenerateOptions, outDir: string, encryptTo: string | null, owner: string): Promise<{ run: RunRow; resumed: boolean }> {
  const formats = options.formats.join(',');
  const opened = await authority.store.writeTransaction(async (trx): Promise<{ run: RunRow; resumed: boolean } | { left: number }> => {
    const now = nowIso();
    const existing = await trx.selectFrom('stamp_runs').select(['id', 'requested', 'formats', 'out_dir', 'encrypt_to', 'archive_name', 'archive_sha256', 'owner', 'heartbeat_at'])
      .where('batch_id', '=', ctx.batchId).where('status', '=', 'running').executeTakeFirst();
    if (existing) {
      const differs = [
        existing.out_dir !== outDir && `it writes to ${existing.out_dir}`,
        Number(existing.requested) !== options.count && `it was asked for ${existing.requested} stamps`,
        existing.formats !== formats && `its formats are ${existing.formats}`,
        existing.encrypt_to !== encryptTo && (existing.encrypt_to ? 'it is encrypted to another factory key' : 'it is not encrypted'),
      ].filter(Boolean);
      if (differs.length > 0) {
        throw new HallmarkError('STAMP_RUN_UNFINISHED', `batch ${ctx.batchId} has an unfinished stamp run ${existing.id} (${differs.join('; ')}): run the same command again to finish it first`);
      }
      if (ownerAlive(existing.owner, existing.heartbeat_at)) {
        const [host, pid] = existing.owner!.split(' ');
        throw new HallmarkError('STAMP_RUN_BUSY', `stamp run ${existing.id} of batch ${ctx.batchId} is being made by another process (pid ${pid} on ${host}, last chunk ${existing.heartbeat_at ?? 'not yet'}): wait for it to finish, or stop it and run the same command again`);
      }
      await trx.updateTable('stamp_runs').set({ owner, heartbeat_at: now }).where('id', '=', existing.id).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'stamp.resume', target: existing.id, details: { batch: ctx.batchId, ...(existing.owner ? { takenOverFrom: existing.owner.split(' ').slice(0, 2).join(' ') } : {}) } }]);
      const { owner: _owner, heartbeat_at: _heartbeat, ...run } = existing;
      return { run: { ...run, requested: Number(existing.requested) }, resumed: true };
    }
    const left = ctx.quota - ctx.issuedCount;
    if (options.count > left) return { left };
    const run: RunRow = { id: `s-${randomBytes(6).toString('hex')}`, requested: options.count, formats, out_dir: outDir, encrypt_to: encryptTo, archive_name: null, archive_sha256: null };
    await trx.insertInto('stamp_runs').values({ ...run, batch_id: ctx.batchId, status: 'running', created_by: options.actor, created_at: now, completed_at: null, owner, heartbeat_at: now }).execute();
    if (!(await trx.selectFrom('tenants').select('name').where('name', '=', DEFAULT_TENANT).executeTakeFirst())) await trx.insertInto('tenants').values({ name: DEFAULT_TENANT, created_at: now }).execute();
    await appendAudit(trx, [{ actor: options.actor, action: 'stamp.start', target: run.id, details: { batch: ctx.batchId, count: options.count, formats, outDir, encryptedToFactoryKey: encryptTo } }]);
    return { run, resumed: false };
  });
  if ('left' in opened) {
    await authority.audit([{ actor: options.actor, action: 'issuance.quota_exceeded', target: ctx.batchId, details: { batch: ctx.batchId, requested: options.count, left: opened.left, source: 'stamp' } }]);
    throw new HallmarkError('QUOTA_EXCEEDED', `batch ${ctx.batchId} has ${opened.left} of its quota of ${ctx.quota} left; ${options.count} stamps were asked for (line ${ctx.lineName})`);
  }
  return opened;
}

/** Gives up ownership of an unfinished run (an invocation that failed), so the next one need not wait. */
async function releaseRun(authority: Authority, runId: string, owner: string): Promise<void> {
  await authority.store.writeTransaction(async (trx) => {
    await trx.updateTable('stamp_runs').set({ owner: null }).where('id', '=', runId).where('owner', '=', owner).execute();
  });
}

/**
 * The stamps of an interrupted invocation whose files are not known to be on disk (their secrets are
 * still kept), rebuilt from the store, in pages. Files that were written are written again: after a
 * kill -9 they are intact, after a power cut they may not be, and the two cannot be told apart.
 */
async function* pendingStamps(authority: Authority, runId: string, ctx: StampContext, org: string, chain: readonly Buffer[], pendingKey: Buffer): AsyncGenerator<Stamp[]> {
  let after = 0;
  for (;;) {
    const rows = await authority.store.db.selectFrom('stamps as s')
      .innerJoin('certificates as c', (j) => j.onRef('c.device_udid', '=', 's.udid').onRef('c.serial', '=', 's.certificate_serial'))
      .innerJoin('devices as d', 'd.udid', 's.udid')
      .select(['s.udid', 's.seq', 's.pending', 'c.der', 'd.serial_number', 'd.public_key_spki'])
      // By (batch_id, seq), the unique index: run_id's index would sort the whole run for every page.
      .where('s.batch_id', '=', ctx.batchId).where('s.seq', '>', after).where('s.run_id', '=', runId).where('s.pending', 'is not', null).orderBy('s.seq').limit(256).execute();
    if (rows.length === 0) return;
    const out: Stamp[] = [];
    for (const r of rows) {
      const secrets = openPending(pendingKey, r.udid, Buffer.from(r.pending!));
      const onboardingSpki = onboardingPublicKey(secrets.onboardingPrivateKeyPkcs8);
      out.push({
        version: STAMP_VERSION, serialNumber: r.serial_number!, udid: r.udid, company: org, product: ctx.productName, batch: ctx.batchId,
        devicePrivateKeyPkcs8: secrets.devicePrivateKeyPkcs8, certificateDer: Buffer.from(r.der), chainDer: chain, popSecret: secrets.popSecret,
        onboardingPublicKeySpki: onboardingSpki, onboardingPrivateKeyPkcs8: secrets.onboardingPrivateKeyPkcs8,
        qrPayload: qrPayloadFor(r.serial_number!, ctx.productName, secrets.popSecret, createHash('sha256').update(onboardingSpki).digest().subarray(0, 16)),
      });
      after = Number(r.seq);
    }
    yield out;
  }
}

/** The X25519 onboarding key's public half (SPKI), from its PKCS#8. */
function onboardingPublicKey(pkcs8: Buffer): Buffer {
  return createPublicKey(createPrivateKey({ key: pkcs8, format: 'der', type: 'pkcs8' })).export({ type: 'spki', format: 'der' });
}

/** One page of a run's summary rows, in seq order after `after`. */
export function summaryPage(db: Kysely<Database>, batchId: string, runId: string, after: number, limit: number) {
  return db.selectFrom('stamps as s')
    .innerJoin('certificates as c', (j) => j.onRef('c.device_udid', '=', 's.udid').onRef('c.serial', '=', 's.certificate_serial'))
    .innerJoin('devices as d', 'd.udid', 's.udid')
    .select(['s.seq', 's.udid', 'd.serial_number', 'c.fingerprint_sha256'])
    // Pages by (batch_id, seq), the unique index: by run_id alone SQLite sorted the whole run for every
    // page (O(N²): 12.5 s of a 100,000-stamp run; 0.64 s this way).
    .where('s.batch_id', '=', batchId).where('s.seq', '>', after).where('s.run_id', '=', runId).orderBy('s.seq').limit(limit);
}

/** Writes the summary CSV; returns its bytes too when `keep` (for the archive: ~150 bytes a device). */
async function writeSummary(authority: Authority, batchId: string, runId: string, path: string, keep: boolean): Promise<Buffer | undefined> {
  // Written from the store (not as files are written), so a resumed run's summary has each stamp once.
  const lines: string[] = [batchSummaryCsvHeader()];
  const file = await open(`${path}.partial`, 'w', 0o644);
  const chunks: Buffer[] = [];
  try {
    let after = 0;
    for (;;) {
      const rows = await summaryPage(authority.store.db, batchId, runId, after, 2000).execute();
      if (rows.length === 0) break;
      for (const r of rows) lines.push(batchSummaryCsvLine({ serialNumber: r.serial_number!, udid: r.udid }, r.fingerprint_sha256));
      after = Number(rows.at(-1)!.seq);
      const data = Buffer.from(lines.join(''), 'utf8');
      if (keep) chunks.push(data);
      await file.write(data);
      lines.length = 0;
    }
    if (lines.length) { const data = Buffer.from(lines.join(''), 'utf8'); if (keep) chunks.push(data); await file.write(data); }
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(`${path}.partial`, path);
  return keep ? Buffer.concat(chunks) : undefined;
}

/**
 * The last step of a run: the file system flushed, then in one transaction the written stamps marked,
 * every kept secret of the run forgotten, the run complete and audited.
 */
async function completeRun(authority: Authority, r: { runId: string; batch: string; outDir: string; actor: string; requested: number; generated: number; rewritten: number; archivePath: string | undefined; written: readonly string[]; archive: boolean; fromFinishedArchive?: boolean }): Promise<void> {
  // The secrets kept in the store are the only copy of the device keys until the files are on disk:
  // flush the file system before forgetting them (the archive is fsync'd by finish(), but its rename
  // into place is only durable once the directory is).
  await flushFileSystem(r.outDir).catch((err: unknown) => {
    throw new HallmarkError('STAMP_WRITE_FAILED', `the stamp files in ${r.outDir} could not be flushed to disk (${(err as Error).message}); their secrets are kept: run the same command again`, { cause: err });
  });
  await authority.store.writeTransaction(async (trx) => {
    const now = nowIso();
    if (!r.archive) await markStampsWritten(trx, authority.store.dialect, r.written, now);
    await forgetStampSecrets(trx, authority.store.dialect, r.runId, now);
    await trx.updateTable('stamp_runs').set({ status: 'complete', completed_at: now, owner: null }).where('id', '=', r.runId).execute();
    await appendAudit(trx, [{ actor: r.actor, action: 'stamp.complete', target: r.runId, details: { batch: r.batch, stamps: r.requested, generatedNow: r.generated, rewritten: r.rewritten, archive: r.archivePath ?? null, ...(r.fromFinishedArchive ? { fromFinishedArchive: true } : {}) } }]);
  });
}

/**
 * An encrypted run whose archive was recorded (name and SHA-256) by an invocation stopped before its
 * last commit: the archive's path when that archive is in place — or still under its .partial name with
 * the recorded bytes (stopped between the record and the rename), then renamed now. Undefined when it is
 * neither (stopped or changed before it was complete): the record is cleared and the run goes on as any
 * interrupted one, writing its stamps into a new part.
 */
async function finishedArchive(authority: Authority, run: RunRow, outDir: string): Promise<string | undefined> {
  const path = join(outDir, run.archive_name!);
  if (await sha256OfFile(path) === run.archive_sha256) return path;
  if (await sha256OfFile(`${path}.partial`) === run.archive_sha256) {
    await publishArchive(path);
    return path;
  }
  await authority.store.writeTransaction(async (trx) => {
    await trx.updateTable('stamp_runs').set({ archive_name: null, archive_sha256: null }).where('id', '=', run.id).execute();
  });
  return undefined;
}

/**
 * Generates (or resumes) a batch's stamps. Refuses beyond the batch quota before making anything,
 * when the product does not allow authority-made keys, or when the batch has expired.
 */
export async function generateStamps(authority: Authority, options: StampGenerateOptions): Promise<StampRunReport> {
  const started = performance.now();
  if (!Number.isInteger(options.count) || options.count < 1 || options.count > MAX_COUNT) throw new HallmarkError('BAD_REQUEST', `the count must be a whole number from 1 to ${MAX_COUNT.toLocaleString('en')}`);
  if (options.formats.length === 0) throw new HallmarkError('BAD_REQUEST', 'at least one stamp format is needed (json, tlv, nvs)');
  const formats = [...new Set(options.formats)].map((f) => formatByName(f));
  const ctx = await stampContext(authority, options.batch);
  if (!ctx.allowServerKeygen) throw new HallmarkError('SERVER_KEYGEN_NOT_ALLOWED', `product ${ctx.productName} does not allow keys made by the authority, which stamps carry (hallmark product create --allow-server-keygen)`);
  if (ctx.expiresAt && new Date(ctx.expiresAt) <= new Date()) throw new HallmarkError('BATCH_EXPIRED', `batch ${ctx.batchId} expired at ${ctx.expiresAt}`);
  const outDir = resolve(options.outDir);
  const encryptTo = options.encryptTo ? createHash('sha256').update(options.encryptTo).digest('hex') : null;
  const issuer = await authority.signingCa(ctx.caName);
  const owner = newOwner();
  const { run, resumed } = await openRun(authority, ctx, options, outDir, encryptTo, owner);
  // From here on, a failure gives the run back (the next invocation need not prove this one dead).
  try {
    await mkdir(outDir, { recursive: true, mode: 0o700 });
    const pendingKey = authority.fileKeys.deriveKey(PENDING_PURPOSE);
    // SQLite: chunks commit on a writer thread (statements, WAL writes, fsync off the event loop) while
    // this thread makes the next chunk. A no-op on PostgreSQL; stopped when the store closes.
    authority.store.writeInBackground();
    const maker: Maker = { ctx, issuer, org: authority.config.org };

    // An encrypted run writes one archive per invocation; a torn one from a killed invocation is removed.
    let archive: Awaited<ReturnType<typeof createArchiveWriter>> | undefined;
    let fileWriter: StampFileWriter | undefined;
    let archivePath: string | undefined;
    if (options.encryptTo && run.archive_name) {
      const finished = await finishedArchive(authority, run, outDir);
      if (finished) {
        // The invocation before finished the archive (every stamp of the run is in it) and was stopped before
        // its last commit: complete the run from that archive rather than write every stamp again.
        const summaryCsv = join(outDir, `stamps-${run.id}.csv`);
        await writeSummary(authority, ctx.batchId, run.id, summaryCsv, false);
        await completeRun(authority, { runId: run.id, batch: ctx.batchId, outDir, actor: options.actor, requested: run.requested, generated: 0, rewritten: 0, archivePath: finished, written: [], archive: true, fromFinishedArchive: true });
        return { runId: run.id, batch: ctx.batchId, requested: run.requested, resumed, rewritten: 0, generated: 0, outDir, summaryCsv, archive: finished, seconds: (performance.now() - started) / 1000 };
      }
    }
    if (options.encryptTo) {
      for (const name of await readdir(outDir)) if (name.startsWith(`stamps-${run.id}`) && name.endsWith('.partial')) await rm(join(outDir, name), { force: true });
      const parts = (await readdir(outDir)).filter((n) => n.startsWith(`stamps-${run.id}-`) && n.endsWith('.hsa')).length;
      archivePath = join(outDir, `stamps-${run.id}-${parts + 1}.hsa`);
      archive = await createArchiveWriter({
        path: archivePath, recipientPublicKeySpki: options.encryptTo, signer: issuer.signer, signerCertificateChain: issuer.chain,
        info: { batch: ctx.batchId, run: run.id, part: parts + 1, product: ctx.productName, formats: run.formats },
      });
    }
    const sink: Sink = archive
      ? { async write(stamps) { for (const s of stamps) for (const f of fileNames(s, formats)) await archive!.add(f.name, f.format.encode(s)); } }
      : plainSink(fileWriter = new StampFileWriter(outDir), formats);

    try {
      const counts = await authority.store.db.selectFrom('stamps').select((eb) => [eb.fn.countAll<number>().as('made'), eb.fn.count<number>('written_at').as('written'), eb.fn.max<number>('seq').as('last')])
        .where('run_id', '=', run.id).executeTakeFirstOrThrow();
      let made = Number(counts.made);
      let done = Number(counts.written);
      options.onProgress?.({ done, total: run.requested });

      // 1. What an interrupted invocation committed but did not write.
      let rewritten = 0;
      for await (const stamps of pendingStamps(authority, run.id, ctx, authority.config.org, issuer.chain, pendingKey)) {
        await sink.write(stamps);
        if (!archive) await authority.store.writeTransaction((trx) => markStampsWritten(trx, authority.store.dialect, stamps.map((s) => s.udid), nowIso()));
        rewritten += stamps.length;
        done += stamps.length;
        options.onProgress?.({ done, total: run.requested });
      }

      // 2. The rest, chunk by chunk: the next chunk is made while this one is stored and written.
      const lastSeq = await authority.store.db.selectFrom('stamps').select((eb) => eb.fn.max<number>('seq').as('last')).where('batch_id', '=', ctx.batchId).executeTakeFirstOrThrow();
      let nextSeq = Number(lastSeq.last ?? 0) + 1;
      const chunkSize = Math.max(1, Math.min(options.chunkSize ?? DEFAULT_CHUNK, 2000));
      let generated = 0;
      // UDIDs whose files are written and whose secrets the next commit clears.
      let written: string[] = [];
      const issuerId = Number(issuer.row.id);
      const take = (): Promise<Prepared[]> | undefined => {
        const n = Math.min(chunkSize, run.requested - made);
        if (n <= 0) return undefined;
        const p = prepareChunk(maker, nextSeq, n);
        nextSeq += n;
        made += n;
        return p;
      };
      // Three stages overlap, each on its own thread: this thread makes chunk k+2 (keys and signatures, with
      // the libuv pool) while chunk k+1 commits (SQLite writer thread) and chunk k's files are written (file
      // writer thread). Order is kept: a chunk commits after the one before it, its files start only after
      // its commit, and its secrets are cleared by the first commit after its files are complete. At most
      // IN_FLIGHT chunks are made but not yet written, so memory stays flat in N.
      let committed: Promise<void> = Promise.resolve();
      let lastFiles: Promise<void> = Promise.resolve();
      const inFlight: Promise<void>[] = [];
      let failure: unknown;
      const fail = (err: unknown): void => { failure ??= err; };
      for (let preparing = take(); preparing;) {
        const chunk = await preparing;
        if (failure) throw failure;
        preparing = take();
        // A failure in the chunk being prepared must not surface as an unhandled rejection meanwhile.
        preparing?.catch(() => {});
        const commit = committed.then(() => {
          if (failure) throw failure;
          const clear = archive ? [] : written;
          written = [];
          return storeChunk(authority, { runId: run.id, ctx, issuerId, chunk, pendingKey, actor: options.actor, written: clear })
            .catch((err: unknown) => { written = [...clear, ...written]; throw err; });
        });
        const files = Promise.all([commit, lastFiles]).then(async () => {
          await sink.write(chunk.map((p) => p.stamp));
          for (const p of chunk) written.push(p.stamp.udid);
          done += chunk.length;
          options.onProgress?.({ done, total: run.requested });
        });
        committed = commit.catch((err: unknown) => { fail(err); });
        lastFiles = files.catch((err: unknown) => { fail(err); });
        inFlight.push(lastFiles);
        generated += chunk.length;
        if (inFlight.length >= IN_FLIGHT) await inFlight.shift();
        if (failure) throw failure;
      }
      await Promise.all([committed, lastFiles]);
      if (failure) throw failure;

      // 3. Summary, archive, and the run marked complete (with the last pending secrets cleared).
      const summaryCsv = join(outDir, `stamps-${run.id}.csv`);
      const summary = await writeSummary(authority, ctx.batchId, run.id, summaryCsv, !!archive);
      if (archive) {
        await archive.add(`stamps-${run.id}.csv`, summary!);
        // Named in the store before it is renamed into place: a kill between the rename and the commit
        // below is finished from this archive next time (finishedArchive) instead of repeating its stamps.
        const name = basename(archivePath!);
        await archive.finish((finished) => authority.store.writeTransaction(async (trx) => {
          await trx.updateTable('stamp_runs').set({ archive_name: name, archive_sha256: finished.sha256 }).where('id', '=', run.id).execute();
        }));
      }
      await completeRun(authority, { runId: run.id, batch: ctx.batchId, outDir, actor: options.actor, requested: run.requested, generated, rewritten, archivePath, written, archive: !!archive });
      return { runId: run.id, batch: ctx.batchId, requested: run.requested, resumed, rewritten, generated, outDir, summaryCsv, ...(archivePath ? { archive: archivePath } : {}), seconds: (performance.now() - started) / 1000 };
    } catch (err) {
      await archive?.abort().catch(() => {});
      throw err;
    } finally {
      await fileWriter?.close();
    }
  } catch (err) {
    await releaseRun(authority, run.id, owner).catch(() => {});
    throw err;
  }
}

export interface StampStatus {
  readonly batch: string;
  readonly quota: number;
  readonly issued: number;
  readonly stamped: number;
  readonly written: number;
  readonly flashed: number;
  /** Stamped devices that have since obtained another certificate themselves (EST re-enrolment). */
  readonly enrolled: number;
  readonly runs: {
    readonly id: string; readonly status: string; readonly requested: number; readonly outDir: string; readonly createdAt: string; readonly completedAt: string | null;
    /** An unfinished run: the process making it now (host and pid) and its last chunk; null when none is (interrupted: run the command again). */
    readonly madeBy: { readonly host: string; readonly pid: number; readonly lastChunkAt: string | null } | null;
  }[];
}

export async function stampStatus(authority: Authority, batchId: string): Promise<StampStatus> {
  const ctx = await stampContext(authority, batchId);
  const db = authority.store.db;
  const counts = await db.selectFrom('stamps').select((eb) => [eb.fn.countAll<number>().as('stamped'), eb.fn.count<number>('written_at').as('written'), eb.fn.count<number>('flashed_at').as('flashed')])
    .where('batch_id', '=', batchId).executeTakeFirstOrThrow();
  const enrolled = await db.selectFrom('stamps as s').innerJoin('certificates as c', 'c.device_udid', 's.udid')
    .select((eb) => eb.fn.count<number>('s.udid').distinct().as('n'))
    .where('s.batch_id', '=', batchId).whereRef('c.serial', '<>', 's.certificate_serial').executeTakeFirstOrThrow();
  const runs = await db.selectFrom('stamp_runs').select(['id', 'status', 'requested', 'out_dir', 'created_at', 'completed_at', 'owner', 'heartbeat_at']).where('batch_id', '=', batchId).orderBy('created_at').execute();
  return {
    batch: batchId, quota: ctx.quota, issued: ctx.issuedCount, stamped: Number(counts.stamped), written: Number(counts.written), flashed: Number(counts.flashed), enrolled: Number(enrolled.n),
    runs: runs.map((r) => {
      const alive = r.status === 'running' && ownerAlive(r.owner, r.heartbeat_at);
      const [host, pid] = (r.owner ?? '').split(' ');
      return { id: r.id, status: r.status, requested: Number(r.requested), outDir: r.out_dir, createdAt: r.created_at, completedAt: r.completed_at, madeBy: alive ? { host: host!, pid: Number(pid), lastChunkAt: r.heartbeat_at } : null };
    }),
  };
}

/**
 * The factory reports which stamps it flashed (serial numbers or UDIDs). Unknown ones are returned,
 * not guessed; flashing twice keeps the first time.
 */
export async function markFlashed(authority: Authority, batchId: string, identifiers: readonly string[], actor: string): Promise<{ marked: number; already: number; unknown: string[] }> {
  await stampContext(authority, batchId);
  const dialect = authority.store.dialect;
  const unique = [...new Set(identifiers.map((s) => s.trim()).filter(Boolean))];
  let marked = 0;
  let already = 0;
  const unknown: string[] = [];
  await authority.store.writeTransaction(async (trx) => {
    const now = nowIso();
    for (let i = 0; i < unique.length; i += 400) {
      const part = unique.slice(i, i + 400);
      const marks = part.map(() => '?').join(', ');
      const rows = (await rawSql<{ udid: string; serial_number: string | null; flashed_at: string | null }>(trx, dialect,
        `select s.udid, d.serial_number, s.flashed_at from stamps s join devices d on d.udid = s.udid where s.batch_id = ? and (s.udid in (${marks}) or d.serial_number in (${marks}))`, [batchId, ...part, ...part])).rows;
      const known = new Set(rows.flatMap((r) => [r.udid, r.serial_number ?? '']));
      unknown.push(...part.filter((p) => !known.has(p)));
      const fresh = rows.filter((r) => !r.flashed_at).map((r) => r.udid);
      already += rows.length - fresh.length;
      for (let j = 0; j < fresh.length; j += 400) {
        const f = fresh.slice(j, j + 400);
        await rawSql(trx, dialect, `update stamps set flashed_at = ? where udid in (${f.map(() => '?').join(', ')})`, [now, ...f]);
      }
      marked += fresh.length;
    }
    await appendAudit(trx, [{ actor, action: 'stamp.flashed', target: batchId, details: { marked, already, unknown: unknown.length } }]);
  });
  return { marked, already, unknown };
}
