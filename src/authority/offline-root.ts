// The offline root: a self-signed CA whose key lives in its own directory (encrypted) or in its own
// PKCS#11 token, and signs only intermediate CA requests during a ceremony. The running server
// never opens it. Every certificate it signs is appended to its journal (issued.jsonl).
//
// Root rollover (RFC 4210 §4.4, RFC 7030 §4.1.3): `rollover` makes a new root key in the same backend,
// its self-signed certificate (NewWithNew) and the two link certificates NewWithOld and OldWithNew. The
// root directory then holds both generations: root.json describes the current one (which `signIntermediate`
// uses) and lists the previous ones under `previous` (their keys stay, for the root CRL and until retired).
//
//   <root>/root.pem                   the current root certificate
//   <root>/root-N.pem                 generation N's self-signed certificate (root-1.pem: the first root)
//   <root>/root-N-newwithold.pem      generation N's key certified by generation N-1's key
//   <root>/root-N-oldwithnew.pem      generation N-1's key certified by generation N's key
//   <root>/revoked.jsonl              intermediates this root directory revoked
//   <root>/NAME.crl, NAME.crl.pem     the CRL of root generation NAME (root, root-2, ...)
//
// Generation 1 is named "root" (as in the store), generation N > 1 "root-N".

import { open as openFile, mkdir, readFile, writeFile, rm, rename } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { HallmarkError } from '../errors.js';
import { FileKeyBackend } from '../keys/file-backend.js';
import type { KeyBackend, KeyRef, Signer } from '../keys/key-backend.js';
import { openPkcs11 } from '../keys/open-backend.js';
import { parseKeyAlgorithm, signingSchemeFor, type KeyAlgorithm } from '../pki/algorithms.js';
import { normaliseSerialHex, parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { parseCsr, verifyCsr } from '../pki/csr.js';
import { keyIdentifier } from '../pki/extensions.js';
import { commonNameOf, decodeName, encodeName, encodeNameString, nameToString } from '../pki/names.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../pki/pem.js';
import { signCertificate, signingCa, subjectKeyKindOf } from './certificate-signer.js';
import { ROOT_FILES, loadRootConfig, writeJsonAtomic, type Pkcs11Settings, type RootConfig } from './home.js';
import { PROFILES } from './profiles.js';
import { parseRevocationReason, type RevocationReason } from './revocation.js';
import { encodeCrl } from '../protocols/crl/crl.js';

export interface RootJournalEntry {
  readonly at: string;
  /** Certificate serial (hex); for a CRL, its CRL number (decimal). */
  readonly serial: string;
  /** Certificate profile, or 'crl'. */
  readonly profile: string;
  readonly subject: string;
  readonly fingerprintSha256: string;
  /** For a CRL: its nextUpdate. */
  readonly notAfter: string;
  /** The root generation that signed it (absent in entries written before rollovers existed: the first root). */
  readonly issuer?: string;
  /** Root certificates: newwithnew (self-signed), newwithold or oldwithnew (link certificates). */
  readonly kind?: 'newwithnew' | 'newwithold' | 'oldwithnew';
  /** CRLs: the CRL number. */
  readonly crlNumber?: number;
}

/** A previous root generation, kept in root.json after a rollover. */
export interface PreviousRoot {
  readonly name: string;
  readonly generation: number;
  readonly subject: string;
  readonly keyRef: KeyRef;
  /** File (in the root directory) holding its self-signed certificate. */
  readonly certificateFile: string;
  readonly createdAt: string;
  readonly supersededAt: string;
}

/** root.json as written by this version: RootConfig plus the rollover fields (all optional, so older files read). */
export interface RootDirConfig extends RootConfig {
  /** 1 for the first root. */
  readonly generation?: number;
  /** Older generations, oldest first. */
  readonly previous?: readonly PreviousRoot[];
}

/** One line of revoked.jsonl. */
export interface RootRevocationEntry {
  readonly at: string;
  readonly serial: string;
  readonly subject: string;
  /** The root generation that issued the revoked certificate (and signs the CRL listing it). */
  readonly issuer: string;
  readonly reason: RevocationReason;
  readonly fingerprintSha256?: string;
}

export interface RolloverResult {
  readonly previous: { readonly name: string; readonly subject: string; readonly der: Buffer };
  readonly current: { readonly name: string; readonly generation: number; readonly subject: string; readonly der: Buffer; readonly serial: string };
  readonly newWithOld: Buffer;
  readonly oldWithNew: Buffer;
  /** The PEM files written into the root directory. */
  readonly files: { readonly newWithNew: string; readonly newWithOld: string; readonly oldWithNew: string; readonly oldWithOld: string };
}

export interface RootCrlResult {
  readonly issuer: string;
  readonly number: number;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date;
  readonly entries: number;
  readonly der: Buffer;
  readonly derPath: string;
  readonly pemPath: string;
}

export const ROOT_ROLLOVER_FILES = {
  revoked: 'revoked.jsonl',
  certificate: (generation: number) => `root-${generation}.pem`,
  newWithOld: (generation: number) => `root-${generation}-newwithold.pem`,
  oldWithNew: (generation: number) => `root-${generation}-oldwithnew.pem`,
  crl: (name: string) => `${name}.crl`,
  crlPem: (name: string) => `${name}.crl.pem`,
} as const;

/** Store / file name of root generation `g`: "root" for the first, "root-N" after. */
export const rootGenerationName = (g: number): string => (g === 1 ? 'root' : `root-${g}`);

/** Default root CRL validity: the root is offline, so its CRL is long-lived (re-sign it with `root crl` before it runs out). */
export const ROOT_CRL_DAYS = 30;

/** Parses a validity such as "20y", "7300d" or "7300" (days) into days. */
export function parseValidity(text: string): number {
  const m = /^\s*(\d{1,5})\s*([yd]?)\s*$/i.exec(text);
  if (!m) throw new HallmarkError('BAD_REQUEST', `not a validity: ${JSON.stringify(text)} (e.g. 20y or 7300d)`);
  const n = Number(m[1]);
  const days = m[2]!.toLowerCase() === 'y' ? n * 365 : n;
  if (days < 1) throw new HallmarkError('BAD_REQUEST', 'the validity must be at least one day');
  return days;
}

/** The subject of generation `g`: the previous subject with its CN given the suffix " g" (any earlier " N" suffix replaced). */
export function successorSubject(previous: Buffer, generation: number): Buffer {
  const attrs = decodeName(previous);
  let found = false;
  const next = attrs.map((a) => {
    if (a.type !== 'CN' || found) return a;
    found = true;
    return { type: a.type, value: `${a.value.replace(/ \d+$/, '')} ${generation}` };
  });
  if (!found) next.push({ type: 'CN', value: `Root CA ${generation}` });
  return encodeName(next);
}

export class OfflineRoot {
  readonly dir: string;
  config: RootDirConfig;
  certificate: ParsedCertificate;
  readonly #backend: KeyBackend;
  #signer: Signer;

  private constructor(dir: string, config: RootDirConfig, certificate: ParsedCertificate, backend: KeyBackend, signer: Signer) {
    this.dir = dir;
    this.config = config;
    this.certificate = certificate;
    this.#backend = backend;
    this.#signer = signer;
  }

  static async create(options: { dir: string; passphrase: string; org: string; subject?: string; algorithm: KeyAlgorithm; pkcs11?: Pkcs11Settings; validityDays?: number }): Promise<OfflineRoot> {
    if (existsSync(join(options.dir, ROOT_FILES.config))) throw new HallmarkError('ALREADY_INITIALISED', `${options.dir} already holds a root CA`);
    const subjectText = options.subject ?? `CN=${options.org} Root CA,O=${options.org}`;
    const subject = encodeNameString(subjectText);
    await mkdir(options.dir, { recursive: true, mode: 0o700 });
    const backend: KeyBackend = options.pkcs11
      ? await openPkcs11(options.pkcs11, options.passphrase, 'root')
      : await FileKeyBackend.create(join(options.dir, ROOT_FILES.keys), options.passphrase);
    try {
      const keyRef = await backend.generateKey('hallmark-root', options.algorithm);
      const signer = await backend.signer(keyRef);
      const ski = keyIdentifier(signer.publicKeySpki);
      const signed = await signCertificate(signingCa(subject, ski, signer), {
        profile: PROFILES.root,
        subject,
        subjectPublicKeyInfo: signer.publicKeySpki,
        subjectKeyKind: options.algorithm,
        validityDays: options.validityDays,
      }, true);
      const config: RootDirConfig = { version: 1, name: 'root', subject: nameToString(subject), keyRef, pkcs11: options.pkcs11, createdAt: new Date().toISOString(), generation: 1 };
      await writeFile(join(options.dir, ROOT_FILES.certificate), encodePem('CERTIFICATE', signed.der));
      const root = new OfflineRoot(options.dir, config, signed.parsed, backend, signer);
      await root.#journal({ at: new Date().toISOString(), serial: signed.serialHex, profile: 'root', subject: config.subject, fingerprintSha256: sha256Fingerprint(signed.der), notAfter: signed.parsed.notAfter.toISOString(), issuer: 'root', kind: 'newwithnew' });
      await writeJsonAtomic(join(options.dir, ROOT_FILES.config), config);
      return root;
    } catch (err) {
      await backend.close().catch(() => {});
      throw err;
    }
  }

  static async open(dir: string, passphrase: string): Promise<OfflineRoot> {
    const config: RootDirConfig = await loadRootConfig(dir);
    let certText: string;
    try { certText = await readFile(join(dir, ROOT_FILES.certificate), 'utf8'); } catch { throw new HallmarkError('ROOT_DIR_INVALID', `${dir} has no ${ROOT_FILES.certificate}`); }
    const certificate = parseCertificate(decodeOne(certText, ['CERTIFICATE'], SIZE_LIMITS.certificate));
    const backend: KeyBackend = config.pkcs11 ? await openPkcs11(config.pkcs11, passphrase, 'root') : await FileKeyBackend.open(join(dir, ROOT_FILES.keys), passphrase);
    try {
      const signer = await backend.signer(config.keyRef);
      if (!signer.publicKeySpki.equals(certificate.subjectPublicKeyInfo)) throw new HallmarkError('ROOT_DIR_INVALID', 'the root key does not match root.pem');
      return new OfflineRoot(dir, config, certificate, backend, signer);
    } catch (err) {
      await backend.close().catch(() => {});
      throw err;
    }
  }

  get certificateDer(): Buffer { return this.certificate.der; }

  /**
   * Signs an intermediate CA request. The subject is the one in the CSR, shown to the ceremony operator.
   * permittedDns / permittedDirectoryNames add critical name constraints (a factory station's sub-CA may
   * name only devices under its batch's DN); notAfter cuts the validity at that instant (the station
   * package's validUntil) and must lie within the root's own validity.
   */
  async signIntermediate(options: {
    csr: string | Buffer; pathLen?: number; validityDays?: number; permittedDns?: readonly string[]; permittedDirectoryNames?: readonly string[]; notAfter?: Date;
    /** A factory station's sub-CA: the SHA-256 of its package's station.json, bound into the certificate. */
    stationManifestSha256?: Buffer;
  }): Promise<{ der: Buffer; serial: string; subject: string; notAfter: Date }> {
    if (options.notAfter !== undefined && options.validityDays !== undefined) throw new HallmarkError('BAD_REQUEST', 'give either a validity in days or a notAfter date, not both');
    const cutAt = options.notAfter;
    if (cutAt !== undefined) {
      if (Number.isNaN(cutAt.getTime())) throw new HallmarkError('BAD_REQUEST', 'notAfter is not a date');
      if (cutAt.getTime() <= Date.now()) throw new HallmarkError('BAD_REQUEST', `notAfter ${cutAt.toISOString()} is not in the future`);
      if (cutAt > this.certificate.notAfter) throw new HallmarkError('BAD_REQUEST', `notAfter ${cutAt.toISOString()} is after the root's own notAfter ${this.certificate.notAfter.toISOString()}`);
      if (cutAt.getTime() - Date.now() > PROFILES.intermediate.maxValidityDays * 86_400_000 - 600_000) throw new HallmarkError('PROFILE_VIOLATION', `notAfter ${cutAt.toISOString()} is more than ${PROFILES.intermediate.maxValidityDays} days away`);
    }
    // Each DN is parsed here, so a typo is refused before anything is signed.
    const directoryNames = (options.permittedDirectoryNames ?? []).map((dn) => encodeNameString(dn));
    const csr = parseCsr(decodeOne(options.csr, ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST'], SIZE_LIMITS.csr));
    const key = await verifyCsr(csr);
    if (csr.subject.length <= 2) throw new HallmarkError('PROFILE_VIOLATION', 'the CA request has an empty subject');
    if (csr.subjectPublicKeyInfo.equals(this.certificate.subjectPublicKeyInfo)) throw new HallmarkError('PROFILE_VIOLATION', 'the request carries the root key itself');
    for (const p of this.config.previous ?? []) {
      const prev = await this.#previousCertificate(p).catch(() => undefined);
      if (prev && csr.subjectPublicKeyInfo.equals(prev.subjectPublicKeyInfo)) throw new HallmarkError('PROFILE_VIOLATION', `the request carries the key of the previous root ${p.name}`);
    }
    // A cut-off date works as the issuer's end does: the certificate never outlives it.
    const ca = signingCa(this.certificate.subject, keyIdentifier(this.certificate.subjectPublicKeyInfo), this.#signer, cutAt ? minDate(this.certificate.notAfter, cutAt) : this.certificate.notAfter);
    const signed = await signCertificate(ca, {
      profile: PROFILES.intermediate,
      subject: csr.subject,
      subjectPublicKeyInfo: csr.subjectPublicKeyInfo,
      subjectKeyKind: subjectKeyKindOf(key),
      pathLen: options.pathLen ?? 0,
      validityDays: cutAt ? Math.min(PROFILES.intermediate.maxValidityDays, Math.max(1, Math.ceil((cutAt.getTime() - Date.now()) / 86_400_000) + 1)) : options.validityDays,
      permittedDns: options.permittedDns,
      permittedDirectoryNames: directoryNames,
      stationManifestSha256: options.stationManifestSha256,
    });
    const subject = nameToString(csr.subject);
    // Journal first: a certificate that leaves the ceremony is always on record.
    await this.#journal({ at: new Date().toISOString(), serial: signed.serialHex, profile: 'intermediate', subject, fingerprintSha256: sha256Fingerprint(signed.der), notAfter: signed.parsed.notAfter.toISOString(), issuer: this.name });
    return { der: signed.der, serial: signed.serialHex, subject, notAfter: signed.parsed.notAfter };
  }

  /** Name of the current generation ("root", "root-2", ...). */
  get name(): string { return this.config.name; }
  get generation(): number { return this.config.generation ?? 1; }

  /** Every generation this directory knows, oldest first, with its certificate. */
  async generations(): Promise<{ name: string; generation: number; certificate: ParsedCertificate; current: boolean }[]> {
    const out: { name: string; generation: number; certificate: ParsedCertificate; current: boolean }[] = [];
    for (const p of this.config.previous ?? []) out.push({ name: p.name, generation: p.generation, certificate: await this.#previousCertificate(p), current: false });
    out.push({ name: this.name, generation: this.generation, certificate: this.certificate, current: true });
    return out;
  }

  async #previousCertificate(p: PreviousRoot): Promise<ParsedCertificate> {
    let text: string;
    try { text = await readFile(join(this.dir, p.certificateFile), 'utf8'); } catch { throw new HallmarkError('ROOT_DIR_INVALID', `${this.dir} has no ${p.certificateFile} (the certificate of ${p.name})`); }
    return parseCertificate(decodeOne(text, ['CERTIFICATE'], SIZE_LIMITS.certificate));
  }

  /** The certificate and signer of generation `name` (the current one or a previous one whose key is still here). */
  async #generation(name: string): Promise<{ certificate: ParsedCertificate; signer: Signer }> {
    if (name === this.name) return { certificate: this.certificate, signer: this.#signer };
    const p = (this.config.previous ?? []).find((g) => g.name === name);
    if (!p) throw new HallmarkError('CA_NOT_FOUND', `this root directory has no root generation named ${JSON.stringify(name)}`);
    const certificate = await this.#previousCertificate(p);
    const signer = await this.#backend.signer(p.keyRef);
    if (!signer.publicKeySpki.equals(certificate.subjectPublicKeyInfo)) throw new HallmarkError('ROOT_DIR_INVALID', `the key of ${p.name} does not match ${p.certificateFile}`);
    return { certificate, signer };
  }

  /**
   * Root rollover: a new root key in the same backend (the key store of this directory, or the same
   * PKCS#11 token), its self-signed certificate and the link certificates NewWithOld (new key, signed by
   * the old key) and OldWithNew (old key, signed by the new key). The new root becomes current (root.pem,
   * root.json); the old one stays in root.json's `previous`, its key kept. Everything is journaled before
   * root.json switches over.
   */
  async rollover(options: { algorithm?: KeyAlgorithm | string; validityDays?: number; subject?: string } = {}): Promise<RolloverResult> {
    const old = this.certificate;
    const oldName = this.name;
    const oldGeneration = this.generation;
    const generation = oldGeneration + 1;
    const name = rootGenerationName(generation);
    if (old.notAfter <= new Date()) throw new HallmarkError('CA_NOT_ACTIVE', `the current root ${oldName} has expired: a rollover needs the old key valid to certify the new one`);
    const algorithm = parseKeyAlgorithm(options.algorithm ?? this.config.keyRef.algorithm);
    const subject = options.subject !== undefined ? encodeNameString(options.subject) : successorSubject(old.subject, generation);
    const known = await this.generations();
    if (known.some((g) => g.certificate.subject.equals(subject))) throw new HallmarkError('BAD_REQUEST', `the new root's subject must differ from every earlier root's (${nameToString(subject)} is taken)`);
    const now = new Date().toISOString();

    const keyRef = await this.#backend.generateKey(`hallmark-root-${generation}`, algorithm);
    const signer = await this.#backend.signer(keyRef);
    const newKeyId = keyIdentifier(signer.publicKeySpki);
    const oldKeyId = keyIdentifier(old.subjectPublicKeyInfo);
    const newWithNew = await signCertificate(signingCa(subject, newKeyId, signer), {
      profile: PROFILES.root, subject, subjectPublicKeyInfo: signer.publicKeySpki, subjectKeyKind: algorithm, validityDays: options.validityDays,
    }, true);
    // NewWithOld: the new public key under the old root's name and key; it ends with the old root.
    const newWithOld = await signCertificate(signingCa(old.subject, oldKeyId, this.#signer, minDate(old.notAfter, newWithNew.parsed.notAfter)), {
      profile: PROFILES.root, subject, subjectPublicKeyInfo: signer.publicKeySpki, subjectKeyKind: algorithm, validityDays: daysUntil(old.notAfter),
    });
    // OldWithNew: the old public key under the new root's name and key; valid as long as the old root.
    const oldAlgorithm = this.config.keyRef.algorithm;
    const oldWithNew = await signCertificate(signingCa(subject, newKeyId, signer, minDate(old.notAfter, newWithNew.parsed.notAfter)), {
      profile: PROFILES.root, subject: old.subject, subjectPublicKeyInfo: old.subjectPublicKeyInfo, subjectKeyKind: oldAlgorithm, validityDays: daysUntil(old.notAfter),
    });

    const files = {
      newWithNew: ROOT_ROLLOVER_FILES.certificate(generation),
      newWithOld: ROOT_ROLLOVER_FILES.newWithOld(generation),
      oldWithNew: ROOT_ROLLOVER_FILES.oldWithNew(generation),
      oldWithOld: ROOT_ROLLOVER_FILES.certificate(oldGeneration),
    };
    await writeFile(join(this.dir, files.oldWithOld), encodePem('CERTIFICATE', old.der));
    await writeFile(join(this.dir, files.newWithNew), encodePem('CERTIFICATE', newWithNew.der));
    await writeFile(join(this.dir, files.newWithOld), encodePem('CERTIFICATE', newWithOld.der));
    await writeFile(join(this.dir, files.oldWithNew), encodePem('CERTIFICATE', oldWithNew.der));
    const subjectText = nameToString(subject);
    const entry = (signed: { der: Buffer; serialHex: string; parsed: ParsedCertificate }, issuer: string, kind: RootJournalEntry['kind']): RootJournalEntry =>
      ({ at: now, serial: signed.serialHex, profile: 'root', subject: nameToString(signed.parsed.subject), fingerprintSha256: sha256Fingerprint(signed.der), notAfter: signed.parsed.notAfter.toISOString(), issuer, kind });
    await this.#journal(entry(newWithNew, name, 'newwithnew'));
    await this.#journal(entry(newWithOld, oldName, 'newwithold'));
    await this.#journal(entry(oldWithNew, name, 'oldwithnew'));

    const previous: PreviousRoot = { name: oldName, generation: oldGeneration, subject: this.config.subject, keyRef: this.config.keyRef, certificateFile: files.oldWithOld, createdAt: this.config.createdAt, supersededAt: now };
    const config: RootDirConfig = { version: 1, name, subject: subjectText, keyRef, pkcs11: this.config.pkcs11, createdAt: now, generation, previous: [...(this.config.previous ?? []), previous] };
    // root.pem first (atomically), then root.json: a crash in between leaves root.json naming the old key,
    // which open() reports as a mismatch rather than silently signing with the wrong root.
    const tmp = join(this.dir, `${ROOT_FILES.certificate}.tmp-${process.pid}`);
    await writeFile(tmp, encodePem('CERTIFICATE', newWithNew.der));
    await rename(tmp, join(this.dir, ROOT_FILES.certificate));
    await writeJsonAtomic(join(this.dir, ROOT_FILES.config), config);
    this.config = config;
    this.certificate = newWithNew.parsed;
    this.#signer = signer;
    return {
      previous: { name: oldName, subject: nameToString(old.subject), der: old.der },
      current: { name, generation, subject: subjectText, der: newWithNew.der, serial: newWithNew.serialHex },
      newWithOld: newWithOld.der,
      oldWithNew: oldWithNew.der,
      files,
    };
  }

  /** The intermediates this directory revoked (revoked.jsonl). */
  async revocations(): Promise<RootRevocationEntry[]> {
    const text = await readFile(join(this.dir, ROOT_ROLLOVER_FILES.revoked), 'utf8').catch(() => '');
    return text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as RootRevocationEntry);
  }

  /**
   * Revokes an intermediate this root directory signed (found in its journal by serial, or by name: the
   * subject's CN equal to NAME or ending in " NAME", as `ca request` writes it), appends it to
   * revoked.jsonl and writes a fresh CRL of the root generation that issued it.
   */
  async revokeIntermediate(options: { serial?: string; ca?: string; reason?: RevocationReason | string; crlDays?: number }): Promise<{ serial: string; subject: string; issuer: string; reason: RevocationReason; crl: RootCrlResult }> {
    const reason = typeof options.reason === 'string' || options.reason === undefined ? parseRevocationReason(options.reason ?? 'cACompromise') : options.reason;
    if (reason === 'certificateHold') throw new HallmarkError('BAD_REQUEST', 'an intermediate is not put on hold: revoke it for good (cACompromise, keyCompromise, superseded, cessationOfOperation, ...)');
    const issued = (await this.journal()).filter((e) => e.profile === 'intermediate');
    let matches: RootJournalEntry[];
    if (options.serial !== undefined) {
      const serial = normaliseSerialHex(options.serial);
      matches = issued.filter((e) => normaliseSerialHex(e.serial) === serial);
    } else if (options.ca !== undefined) {
      const name = options.ca.trim();
      matches = issued.filter((e) => {
        let cn: string | undefined;
        try { cn = commonNameOf(encodeNameString(e.subject)); } catch { cn = undefined; }
        return e.subject === name || cn === name || (cn !== undefined && cn.endsWith(` ${name}`));
      });
    } else {
      throw new HallmarkError('BAD_REQUEST', 'name the intermediate to revoke: --ca NAME or --serial HEX');
    }
    if (matches.length === 0) throw new HallmarkError('CERTIFICATE_NOT_FOUND', `this root directory's journal has no intermediate ${options.serial !== undefined ? `with serial ${options.serial}` : `named ${JSON.stringify(options.ca)}`}`);
    const revoked = await this.revocations();
    const open = matches.filter((m) => !revoked.some((r) => normaliseSerialHex(r.serial) === normaliseSerialHex(m.serial)));
    if (open.length === 0) throw new HallmarkError('ILLEGAL_TRANSITION', `intermediate ${matches[0]!.subject} (serial ${matches[0]!.serial}) is already revoked`);
    if (open.length > 1) throw new HallmarkError('BAD_REQUEST', `several intermediates match ${JSON.stringify(options.ca)}: ${open.map((m) => `${m.serial} (${m.subject})`).join(', ')}; name one with --serial`);
    const target = open[0]!;
    const issuer = target.issuer ?? this.#firstGenerationName();
    await this.#generation(issuer); // the issuing key must still be here to sign the CRL
    const entry: RootRevocationEntry = { at: new Date().toISOString(), serial: normaliseSerialHex(target.serial), subject: target.subject, issuer, reason, fingerprintSha256: target.fingerprintSha256 };
    await this.#append(ROOT_ROLLOVER_FILES.revoked, entry);
    const crl = await this.issueCrl(issuer, { days: options.crlDays });
    return { serial: entry.serial, subject: entry.subject, issuer, reason, crl };
  }

  #firstGenerationName(): string {
    return this.config.previous?.[0]?.name ?? this.name;
  }

  /** Writes a fresh CRL for root generation `name` (default: the current one) listing what revoked.jsonl holds for it. */
  async issueCrl(name: string = this.name, options: { days?: number; now?: Date } = {}): Promise<RootCrlResult> {
    const { certificate, signer } = await this.#generation(name);
    const days = options.days ?? ROOT_CRL_DAYS;
    if (!Number.isInteger(days) || days < 1 || days > 366) throw new HallmarkError('BAD_REQUEST', 'the root CRL validity must be 1 to 366 days');
    const thisUpdate = new Date(Math.floor((options.now ?? new Date()).getTime() / 1000) * 1000);
    const nextUpdate = new Date(thisUpdate.getTime() + days * 86_400_000);
    const first = this.#firstGenerationName();
    const entries = (await this.revocations()).filter((r) => r.issuer === name || (r.issuer === undefined && name === first));
    const previousNumbers = (await this.journal()).filter((e) => e.profile === 'crl' && (e.issuer ?? first) === name).map((e) => e.crlNumber ?? Number(e.serial));
    const number = previousNumbers.length ? Math.max(...previousNumbers) + 1 : 1;
    const scheme = signingSchemeFor(signer.ref.algorithm);
    const der = await encodeCrl({
      issuer: certificate.subject,
      issuerKeyId: keyIdentifier(certificate.subjectPublicKeyInfo),
      scheme,
      thisUpdate,
      nextUpdate,
      number,
      entries: entries.map((e) => ({ serialHex: e.serial, revokedAt: new Date(e.at), reason: e.reason })),
    }, (tbs) => signer.sign(tbs));
    // Journal first: every CRL the root signs is on record.
    await this.#journal({ at: thisUpdate.toISOString(), serial: String(number), profile: 'crl', subject: nameToString(certificate.subject), fingerprintSha256: sha256Fingerprint(der), notAfter: nextUpdate.toISOString(), issuer: name, crlNumber: number });
    const derPath = join(this.dir, ROOT_ROLLOVER_FILES.crl(name));
    const pemPath = join(this.dir, ROOT_ROLLOVER_FILES.crlPem(name));
    await writeFile(derPath, der);
    await writeFile(pemPath, encodePem('X509 CRL', der));
    return { issuer: name, number, thisUpdate, nextUpdate, entries: entries.length, der, derPath, pemPath };
  }

  async journal(): Promise<RootJournalEntry[]> {
    const text = await readFile(join(this.dir, ROOT_FILES.journal), 'utf8').catch(() => '');
    return text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as RootJournalEntry);
  }

  async #journal(entry: RootJournalEntry): Promise<void> {
    await this.#append(ROOT_FILES.journal, entry);
  }

  async #append(file: string, entry: object): Promise<void> {
    const fh = await openFile(join(this.dir, file), 'a', 0o600);
    try {
      await fh.write(JSON.stringify(entry) + '\n');
      await fh.sync();
    } finally {
      await fh.close();
    }
  }

  async close(): Promise<void> {
    await this.#backend.close();
  }

  /** Removes a root directory created by a failed init. */
  static async discard(dir: string): Promise<void> {
    await rm(dir, { recursive: true, force: true });
  }
}

function minDate(a: Date, b: Date): Date {
  return a <= b ? a : b;
}

/** Whole days from now until `end` (at least 1, at most the root profile's maximum): with the issuer's cut-off the certificate ends exactly at `end`. */
function daysUntil(end: Date): number {
  return Math.min(PROFILES.root.maxValidityDays, Math.max(1, Math.ceil((end.getTime() - Date.now()) / 86_400_000) + 1));
}
