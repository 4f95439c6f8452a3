// The offline factory station ("Company A", docs/factory.md): signs CSRs made on the devices with a
// sub-CA key held in a PKCS#11 token, under the quota and within the validity of its package, and
// keeps the journal (journal.ts) that HQ imports later. No network, no database.
//
//   STATIONDIR/station.json, station.pem, chain.pem   the package, copied at init
//   STATIONDIR/station-config.json                    key URI and PKCS#11 module (no PIN, ever)
//   STATIONDIR/journal.jsonl                          the journal
//   STATIONDIR/station.lock                           held by the running command (pid inside)
//
// The rules of the authority hold here too: the subject and identifiers of a device certificate come
// from the package (deviceSubjectBase + CN=<UDID>, the registered UDID and serial), never from the CSR;
// every certificate is parsed back against the device profile (signCertificate); and a certificate
// is handed out only after its journal line is on disk (fdatasync).

import { KeyObject, createPublicKey, randomBytes, verify as cryptoVerify, webcrypto } from 'node:crypto';
import { copyFile, mkdir, open as openFile, readFile, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { HallmarkError } from '../errors.js';
import { signCertificate, signingCa, type SigningCa } from '../authority/certificate-signer.js';
import { PROFILES } from '../authority/profiles.js';
import type { KeyBackend, Signer } from '../keys/key-backend.js';
import { parsePkcs11Uri } from '../keys/pkcs11-backend.js';
import { OID, publicKeyFromSpki, signingSchemeFor, type KeyAlgorithm } from '../pki/algorithms.js';
import { parseCertificate, serialToHex } from '../pki/certificate.js';
import { parseCsr, type ParsedCsr } from '../pki/csr.js';
import { TAG, children, content, decodeOid, readWhole } from '../pki/der.js';
import { SIZE_LIMITS, decodePemBlocks } from '../pki/pem.js';
import { JOURNAL_LIMITS, JournalWriter, type JournalIssueRef, readJournalFile, scanOwnJournal, verifyJournalBuffer, type JournalVerification } from './journal.js';
import { PACKAGE_FILES, deviceSubject, keySha256, readStationPackage, serializeManifest, type StationPackage } from './package.js';

export const STATION_FILES = {
  ...PACKAGE_FILES,
  config: 'station-config.json',
  journal: 'journal.jsonl',
  lock: 'station.lock',
} as const;

/** Device keys the station signs. */
export const STATION_DEVICE_KEYS: readonly KeyAlgorithm[] = ['ecdsa-p256', 'ecdsa-p384', 'ed25519'];

/** CSRs signed per journal write (one fdatasync each). */
const MAX_GROUP = 512;

export interface StationConfig {
  readonly format: 'hallmark-station';
  readonly version: 1;
  readonly stationId: string;
  readonly batch: string;
  /** The key in the token (RFC 7512, no PIN, no query). */
  readonly keyUri: string;
  /** PKCS#11 module path. */
  readonly module: string;
  readonly initialisedAt: string;
}

export interface StationStatus {
  readonly dir: string;
  readonly stationId: string;
  readonly line: string;
  readonly product: string;
  readonly batch: string;
  readonly org: string;
  readonly quota: number;
  /** Certificates signed (the last seq). */
  readonly issued: number;
  readonly left: number;
  readonly validUntil: string;
  /** The earlier of validUntil and the station certificate's notAfter. */
  readonly signsUntil: string;
  readonly expired: boolean;
  /** null: any device key; else how many devices the package lists. */
  readonly registeredDevices: number | null;
  /** Whether station.pem carries (and matches) the digest of station.json: false only for packages made before the binding. */
  readonly manifestBound: boolean;
  readonly lastCheckpoint: { readonly seq: number; readonly at: string } | null;
  /** Issuances after the last checkpoint (export signs them). */
  readonly unsigned: number;
  readonly journalBytes: number;
  readonly keyUri: string;
  readonly module: string;
}

/** One CSR to sign: PEM (one block) or DER bytes, and where it came from (for messages). */
export interface CsrInput {
  readonly source: string;
  readonly data: Buffer | string;
}

export type SignOutcome =
  | {
    readonly ok: true;
    readonly source: string;
    readonly udid: string;
    readonly serialNumber: string | null;
    readonly seq: number;
    /** Device certificate DER. */
    readonly certificate: Buffer;
    readonly certificateSerial: string;
    /** True when the key was already signed and its journalled certificate is handed out again (resend). */
    readonly resent: boolean;
  }
  | { readonly ok: false; readonly source: string; readonly error: HallmarkError };

export interface SignOptions {
  /**
   * Called with each group's outcomes once its journal lines are durable, before the next group is
   * signed: the place to write certificates out. The certificates of a group are never handed out
   * before this point.
   */
  readonly onDurable?: (outcomes: readonly SignOutcome[]) => void | Promise<void>;
  /** A key already signed in this journal gets its journalled certificate again instead of a refusal. */
  readonly resend?: boolean;
}

// ---------------------------------------------------------------- helpers

const notInitialised = (dir: string): HallmarkError =>
  new HallmarkError('STATION_NOT_INITIALISED', `${dir} holds no factory station (run: hallmark station init PACKAGE --dir ${dir} --key pkcs11:…)`);

async function exists(path: string): Promise<boolean> {
  try { await stat(path); return true; } catch { return false; }
}

/** Writes through a temporary name then renames, so no reader sees half a file; `sync` fsyncs before the rename. */
async function writeFileDurably(path: string, data: string | Buffer, options: { sync?: boolean; mode?: number } = {}): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(3).toString('hex')}`;
  const h = await openFile(tmp, 'wx', options.mode ?? 0o644);
  try {
    await h.writeFile(data);
    if (options.sync ?? true) await h.sync();
  } catch (err) {
    await h.close();
    await rm(tmp, { force: true });
    throw err;
  }
  await h.close();
  await rename(tmp, path);
}

/** The key URI without its query (pin-value, module-path never get stored), and the module-path it named. */
function splitKeyUri(uri: string): { keyUri: string; modulePath?: string } {
  const q = uri.indexOf('?');
  if (q < 0) return { keyUri: uri };
  const query = uri.slice(q + 1);
  const m = /(?:^|&)module-path=([^&]*)/.exec(query);
  let modulePath: string | undefined;
  if (m) {
    try { modulePath = decodeURIComponent(m[1]!); } catch { modulePath = undefined; }
  }
  return { keyUri: uri.slice(0, q), modulePath };
}

function checkKeyUri(keyUri: string): { token: string } {
  const uri = parsePkcs11Uri(keyUri);
  if (!uri.token) throw new HallmarkError('BAD_REQUEST', `the key URI must name the token (token=…): ${keyUri}`);
  if (!uri.id || uri.id.length === 0) throw new HallmarkError('BAD_REQUEST', `the key URI must name the key by id (id=…): ${keyUri}`);
  if (uri.type !== undefined && uri.type !== 'private') throw new HallmarkError('BAD_REQUEST', `the key URI names a ${uri.type} object, not the private key`);
  return { token: uri.token };
}

function resolveModule(explicit: string | undefined, fromUri: string | undefined): string {
  const module = explicit || fromUri || process.env.HALLMARK_PKCS11_MODULE;
  if (!module) {
    throw new HallmarkError('BAD_REQUEST', 'which PKCS#11 module drives the token? Give --module PATH (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so; a YubiKey: libykcs11.so) or set HALLMARK_PKCS11_MODULE');
  }
  return module;
}

interface OpenedKey {
  readonly backend: KeyBackend;
  readonly signer: Signer;
}

/** Opens the token, finds the station key and checks it is the key of station.pem. */
async function openStationKey(pkg: StationPackage, keyUri: string, module: string, pin: string): Promise<OpenedKey> {
  if (typeof pin !== 'string' || pin === '') throw new HallmarkError('PASSPHRASE_REQUIRED', 'the token PIN is needed (--pin-file FILE or HALLMARK_PKCS11_PIN)');
  const { token } = checkKeyUri(keyUri);
  const { Pkcs11KeyBackend } = await import('../keys/pkcs11-backend.js');
  const backend = await Pkcs11KeyBackend.open({ module, token, pin });
  try {
    let signer: Signer;
    try {
      signer = await backend.signer({ backend: 'pkcs11', id: keyUri, algorithm: pkg.keyAlgorithm });
    } catch (err) {
      if (err instanceof HallmarkError && err.code === 'KEY_NOT_FOUND') {
        throw new HallmarkError('STATION_KEY_MISMATCH', `the token does not hold the station key: ${err.message} (station.pem holds a ${pkg.keyAlgorithm} key; is this the token HQ prepared for station ${pkg.manifest.stationId}?)`, { cause: err });
      }
      throw err;
    }
    if (!signer.publicKeySpki.equals(pkg.certificate.subjectPublicKeyInfo)) {
      throw new HallmarkError('STATION_KEY_MISMATCH', `the key ${keyUri} in the token is not the key of station.pem (station ${pkg.manifest.stationId}): wrong token or wrong key id`);
    }
    return { backend, signer };
  } catch (err) {
    await backend.close().catch(() => {});
    throw err;
  }
}

/** Signs a random challenge through the token and checks it with station.pem's key. */
async function proveKey(pkg: StationPackage, signer: Signer): Promise<void> {
  const challenge = randomBytes(32);
  const signature = await signer.sign(challenge);
  const key = createPublicKey({ key: pkg.certificate.subjectPublicKeyInfo, format: 'der', type: 'spki' });
  if (!cryptoVerify(signingSchemeFor(pkg.keyAlgorithm).hash, challenge, key, signature)) {
    throw new HallmarkError('STATION_KEY_MISMATCH', 'the token\'s signature does not verify with station.pem\'s key');
  }
}

async function loadConfig(dir: string): Promise<StationConfig> {
  let text: string;
  try {
    text = await readFile(join(dir, STATION_FILES.config), 'utf8');
  } catch {
    throw notInitialised(dir);
  }
  let cfg: StationConfig;
  try {
    cfg = JSON.parse(text) as StationConfig;
  } catch {
    throw new HallmarkError('STATION_NOT_INITIALISED', `${join(dir, STATION_FILES.config)} is not JSON`);
  }
  if (cfg.format !== 'hallmark-station' || cfg.version !== 1 || typeof cfg.keyUri !== 'string' || typeof cfg.module !== 'string') {
    throw new HallmarkError('STATION_NOT_INITIALISED', `${join(dir, STATION_FILES.config)} is not a station configuration`);
  }
  return cfg;
}

// ---------------------------------------------------------------- lock

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Takes STATIONDIR/station.lock (O_EXCL, our pid inside); a lock left by a dead process is taken over. */
async function acquireLock(dir: string): Promise<() => Promise<void>> {
  const path = join(dir, STATION_FILES.lock);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const h = await openFile(path, 'wx', 0o644);
      await h.write(`${process.pid}\n`);
      await h.close();
      let released = false;
      return async () => {
        if (released) return;
        released = true;
        await unlink(path).catch(() => {});
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const pid = Number((await readFile(path, 'utf8').catch(() => '')).trim());
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && processAlive(pid)) {
        throw new HallmarkError('STATION_BUSY', `another station command (pid ${pid}) is using ${dir}; wait for it to finish`);
      }
      if (pid === process.pid) throw new HallmarkError('STATION_BUSY', `this process already has the station ${dir} open`);
      await unlink(path).catch(() => {}); // stale: its process is gone (a crash or kill -9)
    }
  }
  throw new HallmarkError('STATION_BUSY', `cannot take the lock ${path}`);
}

// ---------------------------------------------------------------- CSR key types

const EC_CURVE_NAMES: Record<string, string> = {
  [OID.prime256v1]: 'P-256', [OID.secp384r1]: 'P-384', [OID.secp521r1]: 'P-521',
  '1.2.840.10045.3.1.1': 'P-192', '1.3.132.0.33': 'P-224', '1.3.132.0.10': 'secp256k1',
  '1.3.36.3.3.2.8.1.1.7': 'brainpoolP256r1',
};

/** The station's name for the key in an SPKI, or a description of what it is when not one it signs. */
export function deviceKeyType(spki: Buffer): { algorithm: KeyAlgorithm } | { refused: string } {
  try {
    const top = readWhole(spki, TAG.SEQUENCE, 'SubjectPublicKeyInfo');
    const [algT] = children(spki, top);
    const [oidT, paramT] = children(spki, algT!);
    const alg = decodeOid(content(spki, oidT!));
    if (alg === OID.ecPublicKey) {
      const curve = paramT && paramT.tag === TAG.OID ? decodeOid(content(spki, paramT)) : 'explicit parameters';
      if (curve === OID.prime256v1) return { algorithm: 'ecdsa-p256' };
      if (curve === OID.secp384r1) return { algorithm: 'ecdsa-p384' };
      return { refused: `an EC key on ${EC_CURVE_NAMES[curve] ?? `curve ${curve}`}` };
    }
    if (alg === OID.ed25519) return { algorithm: 'ed25519' };
    if (alg === OID.rsaEncryption) {
      let bits = '';
      try { bits = ` ${createPublicKey({ key: spki, format: 'der', type: 'spki' }).asymmetricKeyDetails?.modulusLength}-bit`; } catch { /* size unknown */ }
      return { refused: `an RSA${bits} key` };
    }
    return { refused: `a key of algorithm ${alg}` };
  } catch {
    return { refused: 'an unreadable public key' };
  }
}

// ---------------------------------------------------------------- the station

interface Prepared {
  readonly index: number;
  readonly source: string;
  readonly spki: Buffer;
  readonly algorithm: KeyAlgorithm;
  readonly keyHash: string;
  readonly udid: string;
  readonly serialNumber: string | null;
}

export class Station {
  readonly dir: string;
  readonly package: StationPackage;
  readonly config: StationConfig;
  /** station.pem and the certificates above it, without the self-signed root: what goes after a device certificate. */
  readonly chainDer: readonly Buffer[];
  readonly #journal: JournalWriter;
  readonly #key: OpenedKey;
  readonly #ca: SigningCa;
  readonly #release: () => Promise<void>;
  #closed = false;
  /** Serialises sign/checkpoint calls: the journal has one writer. */
  #tail: Promise<unknown> = Promise.resolve();

  private constructor(dir: string, pkg: StationPackage, config: StationConfig, journal: JournalWriter, key: OpenedKey, release: () => Promise<void>) {
    this.dir = dir;
    this.package = pkg;
    this.config = config;
    this.#journal = journal;
    this.#key = key;
    this.#release = release;
    this.#ca = signingCa(pkg.certificate.subject, pkg.keyId, key.signer, pkg.certificate.notAfter);
    this.chainDer = [pkg.certificate.der, ...pkg.chain.filter((c) => c !== pkg.root).map((c) => c.der)];
  }

  /**
   * Opens an initialised station: its package, its journal (a torn last line from a crash is cut off),
   * the lock, and the token (PIN). Throws BAD_PASSPHRASE for a wrong PIN, STATION_KEY_MISMATCH when
   * the token holds another key.
   */
  static async open(options: { dir: string; pin: string; module?: string }): Promise<Station> {
    const { dir } = options;
    const config = await loadConfig(dir);
    const pkg = await readStationPackage(dir, { checkValidity: false });
    if (pkg.manifest.stationId !== config.stationId || pkg.manifest.batch !== config.batch) {
      throw new HallmarkError('STATION_PACKAGE_INVALID', `${dir}: station.json (station ${pkg.manifest.stationId}, batch ${pkg.manifest.batch}) does not match station-config.json (station ${config.stationId}, batch ${config.batch})`);
    }
    const release = await acquireLock(dir);
    let journal: JournalWriter | undefined;
    try {
      journal = await JournalWriter.open(join(dir, STATION_FILES.journal), pkg.certificate.der);
      const key = await openStationKey(pkg, config.keyUri, options.module || config.module, options.pin);
      return new Station(dir, pkg, config, journal, key, release);
    } catch (err) {
      await journal?.close().catch(() => {});
      await release();
      throw err;
    }
  }

  /** Bytes cut off the end of the journal at open (a torn line left by a crash), 0 normally. */
  get repairedBytes(): number {
    return this.#journal.repairedBytes;
  }

  status(): StationStatus {
    return statusOf(this.dir, this.package, this.config, this.#journal.state);
  }

  /**
   * Signs CSRs in order. Each CSR gets an outcome: a certificate, or a refusal with a clear error
   * (unparseable, wrong key type, bad CSR signature, unknown device, already signed, quota used up,
   * station expired). Groups of up to 512 are journalled with one durable write; `onDurable` sees a
   * group's outcomes only after that write. Throws only when the token or the disk fails (nothing of
   * the failed group is handed out then).
   */
  sign(inputs: readonly CsrInput[], options: SignOptions = {}): Promise<SignOutcome[]> {
    return this.#serial(async () => {
      const outcomes: SignOutcome[] = [];
      // CSR checks (parse, key type, signature) run ahead of the token, a few chunks at a time on the
      // thread pool, while the token signs the group before: the two overlap.
      const chunks: Promise<Checked[]>[] = [];
      const checkChunk = (k: number): void => {
        if (k * CHECK_CHUNK < inputs.length) chunks[k] ??= Promise.all(inputs.slice(k * CHECK_CHUNK, (k + 1) * CHECK_CHUNK).map((input) => checkCsr(input)));
      };
      let pos = 0;
      while (pos < inputs.length) {
        const group: Checked[] = [];
        const lastSeq = this.#journal.state.lastSeq;
        // A group never crosses a multiple of 1,000 issuances: a checkpoint goes there.
        const room = JOURNAL_LIMITS.checkpointEvery - (lastSeq % JOURNAL_LIMITS.checkpointEvery);
        let acceptable = 0;
        while (pos < inputs.length && group.length < MAX_GROUP && acceptable < room) {
          const k = Math.floor(pos / CHECK_CHUNK);
          for (let ahead = 0; ahead <= CHECK_AHEAD; ahead++) checkChunk(k + ahead);
          const checked = (await chunks[k]!)[pos % CHECK_CHUNK]!;
          group.push(checked);
          if (checked.ok) acceptable++;
          pos++;
          if (pos % CHECK_CHUNK === 0) delete chunks[k]; // done with it: memory stays flat
        }
        const done = await this.#signGroup(group, options);
        outcomes.push(...done);
        if (options.onDurable) await options.onDurable(done);
      }
      return outcomes;
    });
  }

  /** Writes a checkpoint unless the journal already ends with one. Returns whether it wrote one. */
  checkpoint(options: { force?: boolean } = {}): Promise<boolean> {
    return this.#serial(async () => {
      const s = this.#journal.state;
      if (!options.force && s.lastCheckpoint && s.sinceCheckpoint === 0) return false;
      await this.#journal.append([], { at: new Date().toISOString(), sign: (d) => this.#key.signer.sign(d) });
      return true;
    });
  }

  /**
   * Writes a checkpoint if issuances follow the last one (the end of a sign run; `checkpoint: false`
   * leaves that to a later run or to export), then releases the token and the lock.
   */
  async close(options: { checkpoint?: boolean } = {}): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#tail.catch(() => {});
      const s = this.#journal.state;
      if (s.sinceCheckpoint > 0 && options.checkpoint !== false) await this.#journal.append([], { at: new Date().toISOString(), sign: (d) => this.#key.signer.sign(d) });
    } finally {
      await this.#journal.close().catch(() => {});
      await this.#key.backend.close().catch(() => {});
      await this.#release();
    }
  }

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#closed) return Promise.reject(new HallmarkError('BAD_REQUEST', 'the station is closed'));
    const result = this.#tail.then(fn);
    this.#tail = result.catch(() => {});
    return result;
  }

  async #signGroup(checked: readonly Checked[], options: SignOptions): Promise<SignOutcome[]> {
    const outcomes: (SignOutcome | undefined)[] = new Array(checked.length);
    const refuse = (index: number, error: HallmarkError): void => {
      outcomes[index] = { ok: false, source: checked[index]!.source, error };
    };
    const now = new Date();
    if (now >= this.package.signsUntil) {
      const e = new HallmarkError('STATION_EXPIRED', `the station may sign until ${this.package.signsUntil.toISOString()}; it signs nothing more (HQ can prepare a new station package)`);
      return checked.map((c) => ({ ok: false, source: c.source, error: e }));
    }
    // 1. CSRs refused by their own checks (parse, key type, signature).
    const inputs = checked;
    const verified = checked.map((c, index) => {
      if (c.ok) return { index, spki: c.spki, algorithm: c.algorithm };
      refuse(index, c.error);
      return null;
    });

    // 2. Decide in order: device list, duplicates, quota.
    const { manifest } = this.package;
    const state = this.#journal.state;
    let nextSeq = state.lastSeq + 1;
    const inGroup = new Map<string, number>();
    const accepted: Prepared[] = [];
    const resends: { index: number; ref: JournalIssueRef; serialNumber: string | null }[] = [];
    for (const v of verified) {
      if (!v) continue;
      const source = inputs[v.index]!.source;
      const keyHash = keySha256(v.spki);
      let udid = keyHash;
      let serialNumber: string | null = null;
      if (manifest.devices) {
        const d = this.package.devicesByKey.get(keyHash);
        if (!d) { refuse(v.index, new HallmarkError('STATION_DEVICE_UNKNOWN', `the CSR key (SHA-256 ${keyHash}) is not one of the ${manifest.devices.length} devices registered for batch ${manifest.batch}`)); continue; }
        udid = d.udid;
        serialNumber = d.serialNumber;
      }
      const earlier = this.#journal.byKey.get(keyHash);
      const earlierUdid = this.#journal.byUdid.get(udid);
      if (earlier && options.resend) { resends.push({ index: v.index, ref: earlier, serialNumber }); continue; }
      if (earlier || earlierUdid !== undefined) {
        refuse(v.index, new HallmarkError('STATION_DUPLICATE', `device ${udid} was already signed at seq ${earlier?.seq ?? earlierUdid}: a key is signed once (hallmark station sign --resend writes its certificate again)`));
        continue;
      }
      const twin = inGroup.get(keyHash);
      if (twin !== undefined) { refuse(v.index, new HallmarkError('STATION_DUPLICATE', `device ${udid}: the same key is in ${inputs[twin]!.source} too; it is signed once`)); continue; }
      if (nextSeq > manifest.quota) {
        refuse(v.index, new HallmarkError('STATION_QUOTA_EXHAUSTED', `the quota of ${manifest.quota} devices for batch ${manifest.batch} is used up: nothing more is signed (HQ can issue a new station package)`));
        continue;
      }
      inGroup.set(keyHash, v.index);
      accepted.push({ index: v.index, source, spki: v.spki, algorithm: v.algorithm, keyHash, udid, serialNumber });
      nextSeq++;
    }

    // 3. Sign through the token (one session: the backend queues the calls; the JS work overlaps).
    const signed = await Promise.allSettled(accepted.map((p) => signCertificate(this.#ca, {
      profile: PROFILES.device,
      subject: deviceSubject(this.package.subjectBase, p.udid),
      subjectPublicKeyInfo: p.spki,
      subjectKeyKind: p.algorithm,
      validityDays: manifest.deviceValidityDays,
      altNames: { uri: [`urn:hallmark:udid:${p.udid}`, ...(p.serialNumber ? [`urn:hallmark:serial:${encodeURIComponent(p.serialNumber)}`] : [])] },
    })));
    const failure = signed.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failure) {
      // A token or profile failure: nothing of this group is journalled or handed out.
      throw failure.reason;
    }

    // 4. Journal the group durably (plus a checkpoint at a multiple of 1,000), then hand out.
    const at = new Date().toISOString();
    const certs = signed.map((s) => (s as PromiseFulfilledResult<Awaited<ReturnType<typeof signCertificate>>>).value);
    const lastAfter = state.lastSeq + accepted.length;
    const checkpoint = accepted.length > 0 && lastAfter % JOURNAL_LIMITS.checkpointEvery === 0
      ? { at, sign: (d: Buffer) => this.#key.signer.sign(d) }
      : undefined;
    const seqs = await this.#journal.append(accepted.map((p, k) => ({ at, udid: p.udid, serialNumber: p.serialNumber, certificate: certs[k]!.der, keySha256: p.keyHash })), checkpoint);
    accepted.forEach((p, k) => {
      outcomes[p.index] = { ok: true, source: p.source, udid: p.udid, serialNumber: p.serialNumber, seq: seqs[k]!, certificate: certs[k]!.der, certificateSerial: certs[k]!.serialHex, resent: false };
    });
    for (const r of resends) {
      const certificate = await this.#journal.certificateAt(r.ref);
      outcomes[r.index] = { ok: true, source: inputs[r.index]!.source, udid: r.ref.udid, serialNumber: r.serialNumber, seq: r.ref.seq, certificate, certificateSerial: serialToHex(Buffer.from(parseCertificate(certificate).serialHex, 'hex')), resent: true };
    }
    return outcomes as SignOutcome[];
  }
}

/** A CSR after the checks that need no station state: its key (canonical SPKI) and type, or why it is refused. */
type Checked =
  | { readonly ok: true; readonly source: string; readonly spki: Buffer; readonly algorithm: KeyAlgorithm }
  | { readonly ok: false; readonly source: string; readonly error: HallmarkError };

/** CSRs checked per batch on the thread pool, and how many batches run ahead of the token. */
const CHECK_CHUNK = 128;
const CHECK_AHEAD = 2;

/** Parses a CSR, checks its key type and verifies its signature. Never throws: a refusal is an outcome. */
async function checkCsr(input: CsrInput): Promise<Checked> {
  try {
    const csr = parseCsr(csrDer(input.data));
    const type = deviceKeyType(csr.subjectPublicKeyInfo);
    if ('refused' in type) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `the CSR carries ${type.refused}; the station signs only P-256, P-384 and Ed25519 device keys`);
    const spki = await verifyDeviceCsr(csr, type.algorithm);
    return { ok: true, source: input.source, spki, algorithm: type.algorithm };
  } catch (err) {
    const error = err instanceof HallmarkError ? err : new HallmarkError('BAD_CSR', `the CSR cannot be read: ${(err as Error)?.message ?? String(err)}`);
    return { ok: false, source: input.source, error };
  }
}

const P256_SPKI_PREFIX = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d030107034200', 'hex');
const ECDSA_P256 = { name: 'ECDSA', namedCurve: 'P-256' } as const;

/**
 * Verifies a device CSR's self-signature (proof of possession) and returns the key's canonical SPKI
 * DER (the form whose SHA-256 is the registry's key hash). The common case, a P-256 key with an
 * uncompressed point, is imported from the raw point through WebCrypto (which checks the point) and
 * its SPKI taken as it is: exporting the key again costs more than the signature check (OpenSSL 3's
 * encoder). Other keys are exported to their canonical form. The check runs on the thread pool.
 */
async function verifyDeviceCsr(csr: ParsedCsr, algorithm: KeyAlgorithm): Promise<Buffer> {
  const spki = csr.subjectPublicKeyInfo;
  const expectScheme = algorithm === 'ed25519' ? 'Ed25519' : 'ecdsa';
  if (!csr.scheme.name.startsWith(expectScheme)) throw new HallmarkError('CSR_SIGNATURE_INVALID', `CSR signature algorithm ${csr.scheme.name} does not match its ${algorithm} key`);
  let key: KeyObject;
  let canonical: Buffer;
  if (spki.length === 91 && spki.compare(P256_SPKI_PREFIX, 0, 26, 0, 26) === 0 && spki[26] === 0x04) {
    try {
      key = KeyObject.from(await webcrypto.subtle.importKey('raw', spki.subarray(26), ECDSA_P256, true, ['verify']));
    } catch (err) {
      throw new HallmarkError('UNSUPPORTED_ALGORITHM', 'the CSR key is not a valid P-256 point', { cause: err });
    }
    canonical = Buffer.from(spki);
  } else {
    key = publicKeyFromSpki(spki);
    canonical = key.export({ type: 'spki', format: 'der' });
  }
  const ok = await new Promise<boolean>((resolve) => {
    cryptoVerify(csr.scheme.hash, csr.info, key, csr.signature, (err, result) => resolve(!err && result));
  });
  if (!ok) throw new HallmarkError('CSR_SIGNATURE_INVALID', 'the CSR signature does not verify with the key it carries (no proof of possession)');
  return canonical;
}

function csrDer(data: Buffer | string): Buffer {
  const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  if (buf.length > SIZE_LIMITS.csr * 2) throw new HallmarkError('INPUT_TOO_LARGE', `the CSR is over the ${SIZE_LIMITS.csr}-byte limit`);
  if (buf[0] === 0x30) return buf;
  const blocks = decodePemBlocks(buf.toString('utf8'), SIZE_LIMITS.csr);
  if (blocks.length !== 1) throw new HallmarkError('BAD_PEM', `expected one CSR, found ${blocks.length} PEM blocks`);
  const b = blocks[0]!;
  if (b.label !== 'CERTIFICATE REQUEST' && b.label !== 'NEW CERTIFICATE REQUEST') throw new HallmarkError('BAD_PEM', `expected a CERTIFICATE REQUEST, found a ${b.label}`);
  return b.der;
}

/**
 * Splits input holding one DER CSR or any number of concatenated PEM CSRs into inputs named
 * `source` (one block) or `source#N`. Text that is not PEM becomes one input (refused when signed).
 */
export function splitCsrs(data: Buffer | string, source: string): CsrInput[] {
  const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  if (buf.length > 0 && buf[0] === 0x30) return [{ source, data: buf }];
  const text = buf.toString('utf8');
  const re = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----/g;
  const blocks = [...text.matchAll(re)].map((m) => m[0]);
  if (blocks.length <= 1) return [{ source, data: buf }];
  return blocks.map((b, i) => ({ source: `${source}#${i + 1}`, data: b }));
}

function statusOf(dir: string, pkg: StationPackage, config: StationConfig, s: { lastSeq: number; lastCheckpoint: { seq: number; at: string } | null; sinceCheckpoint: number; bytes: number }): StationStatus {
  const m = pkg.manifest;
  return {
    dir, stationId: m.stationId, line: m.line, product: m.product, batch: m.batch, org: m.org, quota: m.quota,
    issued: s.lastSeq, left: Math.max(0, m.quota - s.lastSeq), validUntil: m.validUntil, signsUntil: pkg.signsUntil.toISOString(),
    expired: pkg.signsUntil <= new Date(), registeredDevices: m.devices ? m.devices.length : null, manifestBound: pkg.manifestBound,
    lastCheckpoint: s.lastCheckpoint, unsigned: s.sinceCheckpoint, journalBytes: s.bytes, keyUri: config.keyUri, module: config.module,
  };
}

// ---------------------------------------------------------------- entry points

export interface InitStationOptions {
  /** The station's own directory (created; must not hold a station). */
  readonly dir: string;
  /** The package from HQ. */
  readonly packageDir: string;
  /** The key in the token; default the package's keyUri. A ?module-path=… query is honoured, a pin-value never stored. */
  readonly keyUri?: string;
  readonly pin: string;
  /** PKCS#11 module; default the URI's module-path, then HALLMARK_PKCS11_MODULE. */
  readonly module?: string;
}

/**
 * Sets up a station: checks the package (every field, chain, pathLen 0, name constraints, validity),
 * opens the token with the PIN, checks its key is station.pem's and signs with it, then copies the
 * package into `dir` and starts the journal. Nothing is written unless every check passed.
 */
export async function initStation(options: InitStationOptions): Promise<StationStatus> {
  const { dir } = options;
  const pkg = await readStationPackage(options.packageDir, { requireBoundManifest: true });
  if (await exists(join(dir, STATION_FILES.config)) || await exists(join(dir, STATION_FILES.journal))) {
    throw new HallmarkError('STATION_ALREADY_INITIALISED', `${dir} already holds a station; use another directory`);
  }
  const { keyUri, modulePath } = splitKeyUri(options.keyUri ?? pkg.manifest.keyUri);
  checkKeyUri(keyUri);
  const module = resolveModule(options.module, modulePath);
  const key = await openStationKey(pkg, keyUri, module, options.pin);
  try {
    await proveKey(pkg, key.signer);
  } finally {
    await key.backend.close().catch(() => {});
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const leftovers = await readdir(dir);
  if (leftovers.some((f) => (Object.values(STATION_FILES) as string[]).includes(f))) {
    throw new HallmarkError('STATION_ALREADY_INITIALISED', `${dir} already holds station files (${leftovers.join(', ')}); use an empty directory`);
  }
  for (const f of [PACKAGE_FILES.manifest, PACKAGE_FILES.certificate, PACKAGE_FILES.chain]) {
    await copyFile(join(options.packageDir, f), join(dir, `${f}.tmp-${process.pid}`));
    await rename(join(dir, `${f}.tmp-${process.pid}`), join(dir, f));
  }
  // What was copied is what was checked (the package directory could have changed in between).
  const copied = await readStationPackage(dir);
  if (!copied.certificate.der.equals(pkg.certificate.der) || serializeManifest(copied.manifest) !== serializeManifest(pkg.manifest)) {
    for (const f of [PACKAGE_FILES.manifest, PACKAGE_FILES.certificate, PACKAGE_FILES.chain]) await rm(join(dir, f), { force: true });
    throw new HallmarkError('STATION_PACKAGE_INVALID', `the package in ${options.packageDir} changed while it was being installed; run station init again`);
  }
  await JournalWriter.create(join(dir, STATION_FILES.journal), { stationId: pkg.manifest.stationId, batch: pkg.manifest.batch, station: pkg.certificate.der });
  const config: StationConfig = { format: 'hallmark-station', version: 1, stationId: pkg.manifest.stationId, batch: pkg.manifest.batch, keyUri, module, initialisedAt: new Date().toISOString() };
  await writeFileDurably(join(dir, STATION_FILES.config), JSON.stringify(config, null, 2) + '\n');
  return statusOf(dir, pkg, config, { lastSeq: 0, lastCheckpoint: null, sinceCheckpoint: 0, bytes: 0 });
}

/** Opens the station, signs, writes the end-of-run checkpoint and closes. */
export async function signCsrs(options: { dir: string; pin: string; module?: string; csrs: readonly CsrInput[] } & SignOptions): Promise<SignOutcome[]> {
  const station = await Station.open(options);
  try {
    return await station.sign(options.csrs, options);
  } finally {
    await station.close();
  }
}

/** Reads a station's state without the token (no PIN, no lock; nothing is changed). */
export async function stationStatus(dir: string): Promise<StationStatus> {
  const config = await loadConfig(dir);
  const pkg = await readStationPackage(dir, { checkValidity: false });
  const buf = await readJournalFile(join(dir, STATION_FILES.journal));
  // A line being written right now (or torn by a crash) is not counted.
  const end = buf.lastIndexOf(0x0a) + 1;
  const scan = scanOwnJournal(buf.subarray(0, end), pkg.certificate.der, join(dir, STATION_FILES.journal));
  return statusOf(dir, pkg, config, { ...scan, bytes: end });
}

export interface ExportResult {
  readonly out: string;
  /** Whether export had to sign a checkpoint (the journal did not end with one). */
  readonly checkpointWritten: boolean;
  readonly bytes: number;
  readonly verification: JournalVerification;
}

/**
 * Writes a checkpoint when the journal does not end with one (needs the PIN then), and copies the
 * journal to `out` (written through a temporary file, synced, renamed). The copy is verified as HQ
 * will verify it.
 */
export async function exportJournal(options: { dir: string; out: string; pin?: string; module?: string }): Promise<ExportResult> {
  const { dir, out } = options;
  let checkpointWritten = false;
  const before = await stationStatus(dir);
  if (!before.lastCheckpoint || before.unsigned > 0) {
    if (!options.pin) {
      throw new HallmarkError('PASSPHRASE_REQUIRED', `${before.unsigned} issuance(s) follow the journal's last checkpoint: export signs a checkpoint with the token, so the PIN is needed (--pin-file FILE or HALLMARK_PKCS11_PIN)`);
    }
    const station = await Station.open({ dir, pin: options.pin, module: options.module });
    try {
      checkpointWritten = await station.checkpoint();
    } finally {
      await station.close();
    }
  }
  const release = await acquireLock(dir);
  let data: Buffer;
  try {
    data = await readJournalFile(join(dir, STATION_FILES.journal));
  } finally {
    await release();
  }
  await writeFileDurably(out, data);
  const pkg = await readStationPackage(dir, { checkValidity: false });
  const verification = await verifyJournalBuffer(data, { stationCertificate: pkg.certificate.der, manifest: pkg.manifest });
  return { out, checkpointWritten, bytes: data.length, verification };
}

/** Writes a file through a temporary name, synced, then renamed (the CLI writes certificates with it). */
export { writeFileDurably };
