// The offline root: a self-signed CA whose key lives in its own directory (encrypted) or in its own
// PKCS#11 token, and signs only intermediate CA requests during a ceremony. The running server
// never opens it. Every certificate it signs is appended to its journal (issued.jsonl).

import { open as openFile, mkdir, readFile, writeFile, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { HallmarkError } from '../errors.js';
import { FileKeyBackend } from '../keys/file-backend.js';
import type { KeyBackend, Signer } from '../keys/key-backend.js';
import { openPkcs11 } from '../keys/open-backend.js';
import { type KeyAlgorithm } from '../pki/algorithms.js';
import { parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { parseCsr, verifyCsr } from '../pki/csr.js';
import { keyIdentifier } from '../pki/extensions.js';
import { encodeNameString, nameToString } from '../pki/names.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../pki/pem.js';
import { signCertificate, signingCa, subjectKeyKindOf } from './certificate-signer.js';
import { ROOT_FILES, loadRootConfig, writeJsonAtomic, type Pkcs11Settings, type RootConfig } from './home.js';
import { PROFILES } from './profiles.js';

export interface RootJournalEntry {
  readonly at: string;
  readonly serial: string;
  readonly profile: string;
  readonly subject: string;
  readonly fingerprintSha256: string;
  readonly notAfter: string;
}

export class OfflineRoot {
  readonly dir: string;
  readonly config: RootConfig;
  readonly certificate: ParsedCertificate;
  readonly #backend: KeyBackend;
  readonly #signer: Signer;

  private constructor(dir: string, config: RootConfig, certificate: ParsedCertificate, backend: KeyBackend, signer: Signer) {
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
      const config: RootConfig = { version: 1, name: 'root', subject: nameToString(subject), keyRef, pkcs11: options.pkcs11, createdAt: new Date().toISOString() };
      await writeFile(join(options.dir, ROOT_FILES.certificate), encodePem('CERTIFICATE', signed.der));
      const root = new OfflineRoot(options.dir, config, signed.parsed, backend, signer);
      await root.#journal({ at: new Date().toISOString(), serial: signed.serialHex, profile: 'root', subject: config.subject, fingerprintSha256: sha256Fingerprint(signed.der), notAfter: signed.parsed.notAfter.toISOString() });
      await writeJsonAtomic(join(options.dir, ROOT_FILES.config), config);
      return root;
    } catch (err) {
      await backend.close().catch(() => {});
      throw err;
    }
  }

  static async open(dir: string, passphrase: string): Promise<OfflineRoot> {
    const config = await loadRootConfig(dir);
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

  /** Signs an intermediate CA request. The subject is the one in the CSR, shown to the ceremony operator. */
  async signIntermediate(options: { csr: string | Buffer; pathLen?: number; validityDays?: number; permittedDns?: readonly string[] }): Promise<{ der: Buffer; serial: string; subject: string }> {
    const csr = parseCsr(decodeOne(options.csr, ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST'], SIZE_LIMITS.csr));
    const key = await verifyCsr(csr);
    if (csr.subject.length <= 2) throw new HallmarkError('PROFILE_VIOLATION', 'the CA request has an empty subject');
    if (csr.subjectPublicKeyInfo.equals(this.certificate.subjectPublicKeyInfo)) throw new HallmarkError('PROFILE_VIOLATION', 'the request carries the root key itself');
    const ca = signingCa(this.certificate.subject, keyIdentifier(this.certificate.subjectPublicKeyInfo), this.#signer, this.certificate.notAfter);
    const signed = await signCertificate(ca, {
      profile: PROFILES.intermediate,
      subject: csr.subject,
      subjectPublicKeyInfo: csr.subjectPublicKeyInfo,
      subjectKeyKind: subjectKeyKindOf(key),
      pathLen: options.pathLen ?? 0,
      validityDays: options.validityDays,
      permittedDns: options.permittedDns,
    });
    const subject = nameToString(csr.subject);
    // Journal first: a certificate that leaves the ceremony is always on record.
    await this.#journal({ at: new Date().toISOString(), serial: signed.serialHex, profile: 'intermediate', subject, fingerprintSha256: sha256Fingerprint(signed.der), notAfter: signed.parsed.notAfter.toISOString() });
    return { der: signed.der, serial: signed.serialHex, subject };
  }

  async journal(): Promise<RootJournalEntry[]> {
    const text = await readFile(join(this.dir, ROOT_FILES.journal), 'utf8').catch(() => '');
    return text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as RootJournalEntry);
  }

  async #journal(entry: RootJournalEntry): Promise<void> {
    const fh = await openFile(join(this.dir, ROOT_FILES.journal), 'a', 0o600);
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
