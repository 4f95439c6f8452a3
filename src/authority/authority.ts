// The authority core: decides and signs. Front-ends (CLI, HTTP API, later EST) call this; it is the
// only code that signs certificates and the only code that writes certificates and CAs to the store.

import { join } from 'node:path';
import { mkdir, writeFile } from 'node:fs/promises';
import { generateKeyPair, type KeyObject } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Transaction } from 'kysely';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { FileKeyBackend } from '../keys/file-backend.js';
import type { KeyBackend, KeyRef } from '../keys/key-backend.js';
import { openCaBackend } from '../keys/open-backend.js';
import { parseKeyAlgorithm, publicKeyFromSpki, SCHEME_BY_OID, signingSchemeFor, type KeyAlgorithm } from '../pki/algorithms.js';
import { parseCertificate, sha256Fingerprint, type ParsedCertificate } from '../pki/certificate.js';
import { createCsrWith, csrSpkiOf, parseCsr, verifyCsr, type ParsedCsr } from '../pki/csr.js';
import { keyIdentifier, decodeBasicConstraints, decodeKeyUsage, EXT, type AltNames } from '../pki/extensions.js';
import { encodeName, encodeNameString, nameToString } from '../pki/names.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../pki/pem.js';
import { CertificateRecorder } from '../store/certificate-recorder.js';
import { Store, nowIso, type Dialect } from '../store/database.js';
import type { BatchRow, CaRow, Database, DeviceRow, ProductRow } from '../store/schema.js';
import { asBuffer, defineProcedure, runCalls, type ProcedureCall } from '../store/procedures.js';
import { signCertificate, signingCa, subjectKeyKindOf, type SigningCa } from './certificate-signer.js';
import { HOME_FILES, databaseUrl, loadHomeConfig, saveHomeConfig, type HomeConfig } from './home.js';
import { PROFILES, profileByName } from './profiles.js';
import { verifyIssuedBy } from '../pki/verify.js';
export { verifyIssuedBy } from '../pki/verify.js';
import { DEFAULT_TENANT, Registry, normaliseUdid, udidOfKey } from '../registry/registry.js';
import { rawSql } from '../store/raw-sql.js';
import { registryFor } from '../registry/birth-certificates.js';
import { CaDirectory, describeKeyRef, type CaInfo } from './ca-directory.js';
import { AnnouncedRevocations, watchRevocations } from './revocation-watcher.js';
import { revokeCertificates, revokedEvents, type RevocationReason, type RevocationResult, type RevocationTarget } from './revocation.js';
export type { CaInfo } from './ca-directory.js';
import type { Signer } from '../keys/key-backend.js';

export interface IssueRequest {
  /** PEM, base64 or DER PKCS#10. */
  readonly csr: string | Buffer;
  readonly profile?: string;
  /** Issuing CA name; the configured default issuer otherwise. */
  readonly ca?: string;
  /**
   * Subject DN decided by the caller's authority (the operator here; the registry for devices).
   * When absent on the operator path the CSR's subject is used as the operator approved it.
   */
  readonly subject?: string;
  readonly altNames?: AltNames;
  readonly validityDays?: number;
  /** Who asks: recorded in the audit log and on the certificate record. */
  readonly actor: string;
}

export interface IssuedCertificate {
  readonly serial: string;
  readonly issuer: string;
  readonly profile: string;
  readonly subject: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly fingerprintSha256: string;
  readonly der: Buffer;
  /** Issuing chain, issuer first, root last (DER). */
  readonly chain: readonly Buffer[];
}

/** How often a loaded issuing CA's status is looked at again. */
const ISSUER_RECHECK_MS = 5000;

export interface DeviceIssueRequest {
  readonly udid: string;
  /** PEM, base64 or DER PKCS#10, or an already parsed CSR. */
  readonly csr: string | Buffer | ParsedCsr;
  /** The CSR's key when the caller has already verified the CSR (saves a second verification). */
  readonly csrKey?: KeyObject;
  readonly actor: string;
  /** Keys the caller proved the device holds besides its registered one (its current certificate's key). */
  readonly provenKeys?: readonly Buffer[];
  readonly serverKeygen?: boolean;
  /**
   * Procedures (src/store/procedures.ts) run inside the issuance transaction, after the quota is taken and
   * before the certificate is recorded, their audit entries appended with the issuance's (a claim takes
   * its use there). Data, so the transaction can run in the store's writer thread.
   */
  readonly steps?: readonly ProcedureCall[];
  /**
   * The same as a function: runs inside the issuance transaction; returns audit entries to append with the
   * issuance's. The transaction then runs on this thread's connection (a function cannot go to the writer).
   */
  readonly inTransaction?: (trx: Transaction<Database>, device: DeviceRow, dialect: Dialect) => Promise<readonly AuditEvent[] | void>;
  /** The device is not registered yet: register this key in this batch, in the issuance's transaction (claims on batches that allow unregistered keys). */
  readonly newDevice?: { readonly batch: string; readonly publicKeySpki: Buffer };
  /** A renewal with this current certificate: the product's renewal window applies. */
  readonly renewal?: { readonly serial: string; readonly notBefore: Date; readonly notAfter: Date };
  /** Added to the certificate.issue audit entry (how the device authenticated). */
  readonly auditDetails?: Readonly<Record<string, unknown>>;
}

interface LoadedIssuer extends SigningCa {
  readonly row: CaRow;
  readonly chain: readonly Buffer[];
}

export class Authority {
  readonly store: Store;
  readonly home: string;
  readonly config: HomeConfig;
  readonly fileKeys: FileKeyBackend;
  readonly caKeys: KeyBackend;
  readonly directory: CaDirectory;
  readonly registry: Registry;
  /**
   * What changed, for caches and publishers in this process (CRL, OCSP, webhooks):
   * 'revoked' (RevokedEvent) after the revocation has committed.
   */
  readonly events = new EventEmitter();
  readonly #recorder: CertificateRecorder;
  readonly #announced = new AnnouncedRevocations();
  readonly #issuers = new Map<string, Promise<LoadedIssuer>>();
  readonly #issuerChecked = new Map<string, number>();

  private constructor(home: string, config: HomeConfig, store: Store, fileKeys: FileKeyBackend, caKeys: KeyBackend) {
    this.home = home;
    this.config = config;
    this.store = store;
    this.fileKeys = fileKeys;
    this.caKeys = caKeys;
    this.#recorder = new CertificateRecorder(store);
    this.directory = new CaDirectory(store, config);
    this.registry = registryFor(store);
  }

  /** Opens an initialised home. Needs the passphrase (the key store is encrypted). */
  static async open(home: string, passphrase: string, store?: Store): Promise<Authority> {
    const config = await loadHomeConfig(home);
    const fileKeys = await FileKeyBackend.open(join(home, HOME_FILES.keys), passphrase);
    const caKeys = await openCaBackend(config, fileKeys, passphrase);
    const db = store ?? (await Store.open({ url: databaseUrl(home) }));
    return new Authority(home, config, db, fileKeys, caKeys);
  }

  /** Builds an Authority over already-open parts (used by init). */
  static fromParts(home: string, config: HomeConfig, store: Store, fileKeys: FileKeyBackend, caKeys: KeyBackend): Authority {
    return new Authority(home, config, store, fileKeys, caKeys);
  }

  async close(): Promise<void> {
    if (this.caKeys !== this.fileKeys) await this.caKeys.close();
    await this.fileKeys.close();
    await this.store.close();
  }

  // ------------------------------------------------------------ reading the hierarchy

  listCas(): Promise<CaInfo[]> { return this.directory.listCas(); }
  caChain(name: string, chain = true): Promise<Buffer[]> { return this.directory.caChain(name, chain); }
  rootName(): Promise<string> { return this.directory.rootName(); }
  #caRow(name: string): Promise<CaRow> { return this.directory.caRow(name); }

  /** An issuing CA able to sign (its key loaded from its backend): for CRLs and other CA-signed data. Never the root. */
  signingCa(name: string): Promise<SigningCa & { readonly row: CaRow; readonly chain: readonly Buffer[] }> {
    return this.#issuer(name);
  }

  async #issuer(name: string): Promise<LoadedIssuer> {
    let p = this.#issuers.get(name);
    // A loaded CA may since have been revoked or retired (by the root ceremony, in another process):
    // its status is looked at again every few seconds, so a running server stops issuing from it.
    const checked = this.#issuerChecked.get(name) ?? 0;
    if (p && Date.now() - checked > ISSUER_RECHECK_MS) {
      this.#issuerChecked.set(name, Date.now());
      const row = await this.store.db.selectFrom('certificate_authorities').select('status').where('name', '=', name).executeTakeFirst();
      if (row?.status !== 'active') {
        this.#issuers.delete(name);
        p = undefined;
      }
    }
    if (!p) {
      this.#issuerChecked.set(name, Date.now());
      p = (async () => {
        const row = await this.#caRow(name);
        if (row.role === 'root' || !row.key_ref) throw new HallmarkError('CA_NOT_ACTIVE', `CA ${name} is the offline root: it signs only through the root ceremony`);
        if (row.status !== 'active' || !row.certificate_der) throw new HallmarkError('CA_NOT_ACTIVE', `CA ${name} is ${row.status}`);
        const cert = parseCertificate(Buffer.from(row.certificate_der));
        const signer = await this.caKeys.signer(JSON.parse(row.key_ref) as KeyRef);
        if (!signer.publicKeySpki.equals(cert.subjectPublicKeyInfo)) throw new HallmarkError('KEY_BACKEND_FAILED', `the key of CA ${name} does not match its certificate`);
        const chain = await this.caChain(name);
        const base = this.config.publicUrl;
        const pointers = base ? { crl: `${base}/crl/${encodeURIComponent(name)}.crl`, ocsp: `${base}/ocsp`, caIssuers: `${base}/ca/${encodeURIComponent(name)}.crt` } : undefined;
        return { ...signingCa(cert.subject, Buffer.from(row.ski, 'hex'), signer, cert.notAfter), pointers, row, chain };
      })();
      this.#issuers.set(name, p);
      p.catch(() => this.#issuers.delete(name));
    }
    return p;
  }

  // ------------------------------------------------------------ issuance

  /** Issues one certificate from a CSR under a profile. Durably recorded (with its audit entry) before it is returned. */
  async issue(request: IssueRequest): Promise<IssuedCertificate> {
    const profile = profileByName(request.profile ?? 'device');
    if (profile.ca) throw new HallmarkError('PROFILE_VIOLATION', `profile ${profile.name} is issued only through the root ceremony (hallmark ca request / root sign)`);
    const csr = parseCsr(typeof request.csr === 'string' || !(request.csr[0] === 0x30) ? decodeOne(request.csr, ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST'], SIZE_LIMITS.csr) : request.csr);
    const issuerName = request.ca ?? this.config.defaultIssuer;
    const [issuer, key] = await Promise.all([this.#issuer(issuerName), verifyCsr(csr)]);
    const subject = request.subject !== undefined ? encodeNameString(request.subject) : csr.subject;
    if (subject.length <= 2 && profile.name !== 'tls-server') throw new HallmarkError('PROFILE_VIOLATION', 'the certificate subject is empty (give --subject)');
    for (let attempt = 0; ; attempt++) {
      const signed = await signCertificate(issuer, {
        profile,
        subject,
        subjectPublicKeyInfo: csr.subjectPublicKeyInfo,
        subjectKeyKind: subjectKeyKindOf(key),
        validityDays: request.validityDays,
        altNames: request.altNames,
      });
      const subjectText = nameToString(subject);
      const fingerprint = sha256Fingerprint(signed.der);
      try {
        await this.#recorder.record(
          {
            issuer_id: issuer.row.id,
            serial: signed.serialHex,
            profile: profile.name,
            subject: subjectText,
            fingerprint_sha256: fingerprint,
            not_before: nowIso(signed.parsed.notBefore),
            not_after: nowIso(signed.parsed.notAfter),
            der: signed.der,
            status: 'valid',
            revoked_at: null,
            revocation_reason: null,
            requested_by: request.actor,
            created_at: nowIso(),
          },
          { actor: request.actor, action: 'certificate.issue', target: signed.serialHex, details: { issuer: issuerName, profile: profile.name, subject: subjectText, fingerprintSha256: fingerprint, notAfter: nowIso(signed.parsed.notAfter) } },
        );
      } catch (err) {
        if (err instanceof HallmarkError && err.code === 'SERIAL_COLLISION' && attempt < 3) continue;
        throw err;
      }
      return {
        serial: signed.serialHex,
        issuer: issuerName,
        profile: profile.name,
        subject: subjectText,
        notBefore: signed.parsed.notBefore,
        notAfter: signed.parsed.notAfter,
        fingerprintSha256: fingerprint,
        der: signed.der,
        chain: issuer.chain,
      };
    }
  }

  /**
   * The device path: issues an operational certificate to a registered device. The registry decides:
   * the device's state, its key (the CSR must carry the registered hardware key, a key the caller proved
   * the device holds — its current certificate's — or, when the product allows rekey, any key no other
   * device holds), its batch quota (checked before signing and taken atomically in the commit). Subject
   * and identifiers come from the registry, never from the CSR. A refusal is audited (and counted per
   * batch and line for quota).
   *
   * serverKeygen: the authority makes the device's key (EST serverkeygen; the product must allow it) and
   * returns it once as PKCS#8 — it is never stored or logged.
   * inTransaction: runs inside the issuance transaction (a claim takes its use there, so a refused
   * issuance never spends a claim and a spent claim never yields two certificates).
   */
  async issueForDevice(request: DeviceIssueRequest): Promise<IssuedCertificate & { privateKeyPkcs8?: Buffer }> {
    const { device, batch, product, line } = await this.#deviceContext(request);
    const refuse = async (err: HallmarkError): Promise<never> => {
      await this.registry.recordRefusedIssuance(device, err, request.actor);
      throw err;
    };
    if (!['registered', 'provisioned', 'active'].includes(device.state)) return refuse(new HallmarkError('DEVICE_NOT_ELIGIBLE', `device ${device.udid} is ${device.state}: no certificate may be issued to it`));
    const percent = Number(product.renew_after_percent);
    if (request.renewal && percent > 0) {
      const { notBefore, notAfter } = request.renewal;
      const opens = new Date(notBefore.getTime() + ((notAfter.getTime() - notBefore.getTime()) * percent) / 100);
      if (opens > new Date()) {
        return refuse(Object.assign(new HallmarkError('RENEWAL_NOT_DUE', `certificate ${request.renewal.serial} may be renewed from ${opens.toISOString()} (product ${product.name} renews after ${percent}% of the lifetime)`), {
          retryAfterSeconds: Math.ceil((opens.getTime() - Date.now()) / 1000),
        }));
      }
    }
    const csr = typeof request.csr === 'object' && !Buffer.isBuffer(request.csr) ? request.csr : parseCsr(decodeOne(request.csr, ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST'], SIZE_LIMITS.csr));
    const csrKey = request.csrKey ?? (await verifyCsr(csr));
    let subjectSpki: Buffer;
    let subjectKey: KeyObject;
    let privateKeyPkcs8: Buffer | undefined;
    if (request.serverKeygen) {
      if (!Number(product.allow_server_keygen)) return refuse(new HallmarkError('SERVER_KEYGEN_NOT_ALLOWED', `product ${product.name} does not allow server-side key generation (hallmark product create --allow-server-keygen)`));
      const pair = await generateDeviceKey();
      subjectKey = pair.publicKey;
      subjectSpki = pair.publicKey.export({ type: 'spki', format: 'der' });
      privateKeyPkcs8 = pair.privateKey.export({ type: 'pkcs8', format: 'der' });
    } else {
      subjectKey = csrKey;
      subjectSpki = csrSpkiOf(csr, csrKey);
      const registered = subjectSpki.equals(Buffer.from(device.public_key_spki));
      const proven = (request.provenKeys ?? []).some((k) => k.equals(subjectSpki));
      if (!registered && !proven) {
        if (!Number(product.allow_rekey)) return refuse(new HallmarkError('KEY_MISMATCH', `the CSR key is not the key registered for device ${device.udid} (product ${product.name} does not allow rekey)`));
        const holder = await this.registry.deviceByPublicKey(subjectSpki);
        if (holder && holder.udid !== device.udid) return refuse(new HallmarkError('CLONE_DETECTED', `the CSR key is the registered key of another device (${holder.udid})`));
      }
    }
    if (device.state === 'registered') {
      if (batch.expires_at && new Date(batch.expires_at) <= new Date()) return refuse(new HallmarkError('BATCH_EXPIRED', `batch ${batch.id} expired at ${batch.expires_at}`));
      if (Number(batch.issued_count) >= Number(batch.quota)) {
        // The device row was read before the batch: a concurrent request may have given this very device its
        // first identity in between (it is then a renewal). Only a device still waiting for one is over quota.
        const now = request.newDevice ? undefined : await this.registry.deviceRow(device.udid);
        if (!now || (now.state === 'registered' && now.batch_id === batch.id)) return refuse(new HallmarkError('QUOTA_EXCEEDED', `batch ${batch.id} has used its quota of ${batch.quota} operational identities (line ${line.name})`));
      }
    }
    const profile = profileByName(product.profile);
    const issuer = await this.#issuer(line.ca);
    const subjectAttributes = [
      ...(device.serial_number ? [{ type: 'SERIALNUMBER', value: device.serial_number }] : []),
      { type: 'CN', value: device.udid },
      { type: 'OU', value: product.name },
      { type: 'O', value: this.config.org },
    ];
    const subject = encodeName(subjectAttributes);
    const uris = [`urn:hallmark:udid:${device.udid}`, ...(device.serial_number ? [`urn:hallmark:serial:${encodeURIComponent(device.serial_number)}`] : [])];
    const signed = await signCertificate(issuer, {
      profile, subject, subjectPublicKeyInfo: subjectSpki, subjectKeyKind: subjectKeyKindOf(subjectKey),
      validityDays: product.validity_days, altNames: profile.subjectAltName === 'none' ? undefined : { uri: uris },
    });
    const subjectText = nameToString(subject);
    const fingerprint = sha256Fingerprint(signed.der);
    const record: DeviceIssuanceRecord = {
      device, batch, newDevice: !!request.newDevice, actor: request.actor, steps: request.steps ?? [],
      certificate: [issuer.row.id, signed.serialHex, profile.name, subjectText, fingerprint, nowIso(signed.parsed.notBefore), nowIso(signed.parsed.notAfter), signed.der, 'valid', null, null, request.actor, nowIso(), device.udid],
      issueDetails: { device: device.udid, batch: batch.id, line: line.name, issuer: line.ca, profile: profile.name, subject: subjectText, fingerprintSha256: fingerprint, notAfter: nowIso(signed.parsed.notAfter), ...(privateKeyPkcs8 ? { serverKeygen: true } : {}), ...request.auditDetails },
    };
    try {
      const closure = request.inTransaction;
      if (closure) await this.store.commitWork((trx, dialect) => recordDeviceIssuance(trx, dialect, record, closure));
      else await this.store.commit(RECORD_DEVICE_ISSUANCE, record);
    } catch (err) {
      if (err instanceof HallmarkError && ['QUOTA_EXCEEDED', 'DEVICE_NOT_ELIGIBLE', 'CLAIM_INVALID', 'CLAIM_ALREADY_USED', 'CLONE_DETECTED', 'ENROLMENT_REJECTED'].includes(err.code)) return refuse(err);
      throw err;
    }
    return {
      serial: signed.serialHex, issuer: line.ca, profile: profile.name, subject: subjectText, notBefore: signed.parsed.notBefore, notAfter: signed.parsed.notAfter,
      fingerprintSha256: fingerprint, der: signed.der, chain: issuer.chain, ...(privateKeyPkcs8 ? { privateKeyPkcs8 } : {}),
    };
  }

  /** The device (as registered, or as it will be when registered on first use), its batch, product and line with its CA: one query. */
  async #deviceContext(request: DeviceIssueRequest): Promise<{ device: DeviceRow; batch: BatchRow; product: ProductRow; line: { name: string; ca: string } }> {
    // Hand-written SQL (src/store/raw-sql.ts): this runs for every enrolment.
    const dialect = this.store.dialect;
    const existing = request.newDevice ? undefined : (await rawSql<DeviceRow>(this.store.db, dialect, 'select * from devices where udid = ?', [normaliseUdid(request.udid)])).rows[0];
    if (!request.newDevice && !existing) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${request.udid}`);
    const batchId = existing ? existing.batch_id : request.newDevice!.batch;
    const row = (await rawSql<BatchRow & {
      product_name: string; profile: string; validity_days: number; allow_server_keygen: number; allow_rekey: number; renew_after_percent: number; policy: string | null; product_created_at: string; line_name: string; ca_name: string;
    }>(this.store.db, dialect, `select b.id, b.product_id, b.line_id, b.quota, b.issued_count, b.refused_count, b.allow_unregistered, b.require_approval, b.expires_at, b.created_at,
        p.name as product_name, p.profile, p.validity_days, p.allow_server_keygen, p.allow_rekey, p.renew_after_percent, p.policy, p.created_at as product_created_at, l.name as line_name, ca.name as ca_name
      from batches b join products p on p.id = b.product_id join lines l on l.id = b.line_id join certificate_authorities ca on ca.id = l.ca_id where b.id = ?`, [batchId])).rows[0];
    if (!row) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${batchId}`);
    const batch: BatchRow = { id: row.id, product_id: row.product_id, line_id: row.line_id, quota: row.quota, issued_count: row.issued_count, refused_count: row.refused_count, allow_unregistered: row.allow_unregistered, require_approval: row.require_approval, expires_at: row.expires_at, created_at: row.created_at };
    const product: ProductRow = { id: row.product_id, name: row.product_name, profile: row.profile, validity_days: row.validity_days, allow_server_keygen: row.allow_server_keygen, allow_rekey: row.allow_rekey, renew_after_percent: row.renew_after_percent, policy: row.policy, created_at: row.product_created_at };
    const now = nowIso();
    const device: DeviceRow = existing ?? {
      udid: udidOfKey(request.newDevice!.publicKeySpki), public_key_spki: request.newDevice!.publicKeySpki, public_key_sha256: udidOfKey(request.newDevice!.publicKeySpki),
      serial_number: null, product_id: row.product_id, line_id: row.line_id, batch_id: row.id, tenant: DEFAULT_TENANT, birth_cert_der: null, state: 'registered',
      created_at: now, updated_at: now, provisioned_at: null,
    };
    return { device, batch, product, line: { name: row.line_name, ca: row.ca_name } };
  }

  /** Issues a certificate for a key this authority holds itself (OCSP signer, TLS server). */
  async issueForOwnKey(options: { signer: Signer; profile: 'ocsp-signer' | 'tls-server'; subject: string; altNames?: AltNames; ca?: string; actor: string }): Promise<IssuedCertificate> {
    const issuerName = options.ca ?? this.config.defaultIssuer;
    const issuer = await this.#issuer(issuerName);
    const profile = profileByName(options.profile);
    const key = publicKeyFromSpki(options.signer.publicKeySpki);
    const subject = encodeNameString(options.subject);
    const signed = await signCertificate(issuer, { profile, subject, subjectPublicKeyInfo: options.signer.publicKeySpki, subjectKeyKind: subjectKeyKindOf(key), altNames: options.altNames });
    const subjectText = nameToString(subject);
    const fingerprint = sha256Fingerprint(signed.der);
    await this.#recorder.record(
      { issuer_id: issuer.row.id, serial: signed.serialHex, profile: profile.name, subject: subjectText, fingerprint_sha256: fingerprint, not_before: nowIso(signed.parsed.notBefore), not_after: nowIso(signed.parsed.notAfter), der: signed.der, status: 'valid', revoked_at: null, revocation_reason: null, requested_by: options.actor, created_at: nowIso() },
      { actor: options.actor, action: 'certificate.issue', target: signed.serialHex, details: { issuer: issuerName, profile: profile.name, subject: subjectText, fingerprintSha256: fingerprint } },
    );
    return { serial: signed.serialHex, issuer: issuerName, profile: profile.name, subject: subjectText, notBefore: signed.parsed.notBefore, notAfter: signed.parsed.notAfter, fingerprintSha256: fingerprint, der: signed.der, chain: issuer.chain };
  }

  async findCertificate(serial: string): Promise<{ serial: string; issuer: string; profile: string; subject: string; status: string; notBefore: string; notAfter: string; fingerprintSha256: string; der: Buffer }[]> {
    const rows = await this.store.db.selectFrom('certificates').innerJoin('certificate_authorities as ca', 'ca.id', 'certificates.issuer_id')
      .select(['certificates.serial', 'ca.name as issuer', 'certificates.profile', 'certificates.subject', 'certificates.status', 'certificates.not_before', 'certificates.not_after', 'certificates.fingerprint_sha256', 'certificates.der'])
      .where('certificates.serial', '=', serial).execute();
    return rows.map((r) => ({ serial: r.serial, issuer: r.issuer, profile: r.profile, subject: r.subject, status: r.status, notBefore: r.not_before, notAfter: r.not_after, fingerprintSha256: r.fingerprint_sha256, der: Buffer.from(r.der) }));
  }

  // ------------------------------------------------------------ offline ceremony, online side

  /** Generates a key for a new intermediate CA in the configured backend and returns its CSR. */
  async requestCa(options: { name: string; algorithm?: KeyAlgorithm | string; subject?: string; actor: string }): Promise<{ csrPem: string; path: string }> {
    if (!/^[a-z0-9][a-z0-9._-]{0,62}$/i.test(options.name)) throw new HallmarkError('BAD_REQUEST', 'CA names are 1-63 letters, digits, dot, dash or underscore');
    const existing = await this.store.db.selectFrom('certificate_authorities').select('id').where('name', '=', options.name).executeTakeFirst();
    if (existing) throw new HallmarkError('CA_EXISTS', `a CA named ${options.name} already exists`);
    const algorithm = parseKeyAlgorithm(options.algorithm ?? 'ecdsa-p256');
    const subjectText = options.subject ?? `CN=${this.config.org} ${options.name},O=${this.config.org}`;
    const subject = encodeNameString(subjectText);
    const ref = await this.caKeys.generateKey(`hallmark-ca-${options.name}`, algorithm);
    const signer = await this.caKeys.signer(ref);
    const csrDer = await csrFromSigner(subject, signer);
    const now = nowIso();
    await this.store.writeTransaction(async (trx) => {
      await trx.insertInto('certificate_authorities').values({
        name: options.name, role: 'intermediate', parent_id: null, status: 'pending', subject: nameToString(subject), key_ref: JSON.stringify(ref),
        key_algorithm: algorithm, ski: keyIdentifier(signer.publicKeySpki).toString('hex'), path_len: null, certificate_der: null, csr_der: csrDer,
        serial: null, not_before: null, not_after: null, created_at: now, updated_at: now,
      }).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'ca.request', target: options.name, details: { subject: nameToString(subject), keyAlgorithm: algorithm, keyLocation: describeKeyRef(JSON.stringify(ref)) } }]);
    });
    const dir = join(this.home, HOME_FILES.requests);
    await mkdir(dir, { recursive: true });
    const path = join(dir, `${options.name}.csr`);
    const csrPem = encodePem('CERTIFICATE REQUEST', csrDer);
    await writeFile(path, csrPem);
    return { csrPem, path };
  }

  /**
   * A new intermediate signed online by an existing intermediate whose path length allows it (for
   * a production line's own CA without a root ceremony). The new CA gets pathLen 0.
   */
  async createSubordinateCa(options: { name: string; parent: string; algorithm?: KeyAlgorithm | string; actor: string }): Promise<CaInfo> {
    if (!/^[a-z0-9][a-z0-9._-]{0,62}$/i.test(options.name)) throw new HallmarkError('BAD_REQUEST', 'CA names are 1-63 letters, digits, dot, dash or underscore');
    if (await this.store.db.selectFrom('certificate_authorities').select('id').where('name', '=', options.name).executeTakeFirst()) throw new HallmarkError('CA_EXISTS', `a CA named ${options.name} already exists`);
    const parent = await this.#issuer(options.parent);
    if (parent.row.path_len === null || Number(parent.row.path_len) < 1) {
      throw new HallmarkError('CA_NOT_ACTIVE', `CA ${options.parent} may not sign CA certificates (its path length is ${parent.row.path_len ?? 'absent'}); use the root ceremony, or a parent signed with --path-len 1`);
    }
    const algorithm = parseKeyAlgorithm(options.algorithm ?? 'ecdsa-p256');
    const subject = encodeNameString(`CN=${this.config.org} ${options.name},O=${this.config.org}`);
    const ref = await this.caKeys.generateKey(`hallmark-ca-${options.name}`, algorithm);
    const signer = await this.caKeys.signer(ref);
    const signed = await signCertificate(parent, { profile: PROFILES.intermediate, subject, subjectPublicKeyInfo: signer.publicKeySpki, subjectKeyKind: algorithm, pathLen: 0 });
    const subjectText = nameToString(subject);
    const fingerprint = sha256Fingerprint(signed.der);
    const now = nowIso();
    await this.store.writeTransaction(async (trx) => {
      await trx.insertInto('certificate_authorities').values({
        name: options.name, role: 'intermediate', parent_id: parent.row.id, status: 'active', subject: subjectText, key_ref: JSON.stringify(ref),
        key_algorithm: algorithm, ski: keyIdentifier(signer.publicKeySpki).toString('hex'), path_len: 0, certificate_der: signed.der, csr_der: null,
        serial: signed.serialHex, not_before: nowIso(signed.parsed.notBefore), not_after: nowIso(signed.parsed.notAfter), created_at: now, updated_at: now,
      }).execute();
      await trx.insertInto('certificates').values({
        issuer_id: parent.row.id, serial: signed.serialHex, profile: 'intermediate', subject: subjectText, fingerprint_sha256: fingerprint,
        not_before: nowIso(signed.parsed.notBefore), not_after: nowIso(signed.parsed.notAfter), der: signed.der, status: 'valid', revoked_at: null,
        revocation_reason: null, requested_by: options.actor, created_at: now,
      }).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'ca.create', target: options.name, details: { parent: options.parent, subject: subjectText, serial: signed.serialHex, fingerprintSha256: fingerprint, keyAlgorithm: algorithm, keyLocation: describeKeyRef(JSON.stringify(ref)) } }]);
    });
    return (await this.listCas()).find((c) => c.name === options.name)!;
  }

  /** Installs a certificate signed by the root for a pending CA request. */
  async installCa(options: { certificate: string | Buffer; makeDefault?: boolean; actor: string }): Promise<CaInfo> {
    const der = decodeOne(options.certificate, ['CERTIFICATE'], SIZE_LIMITS.certificate);
    const cert = parseCertificate(der);
    const ski = keyIdentifier(cert.subjectPublicKeyInfo).toString('hex');
    const pending = await this.store.db.selectFrom('certificate_authorities').selectAll().where('ski', '=', ski).where('status', '=', 'pending').executeTakeFirst();
    if (!pending) throw new HallmarkError('CA_CERT_MISMATCH', 'no pending CA request has this certificate\'s key (run hallmark ca request first)');
    // A factory station's CA (src/authority/station.ts) has no online key: its certificate has its own checks (name constraints, validity, package).
    if (!pending.key_ref) throw new HallmarkError('CA_CERT_MISMATCH', `${pending.name} is a factory station's CA: install its certificate with hallmark station install`);
    // Either root during a rollover: the one whose name and key signed this certificate.
    const rootName = await this.directory.issuingRootOf(cert);
    const [rootDer] = await this.caChain(rootName, false);
    const root = parseCertificate(rootDer!);
    verifyIssuedBy(cert, root);
    const bcExt = cert.extensions.get(EXT.basicConstraints);
    const bc = bcExt ? decodeBasicConstraints(bcExt.value) : { ca: false };
    if (!bc.ca) throw new HallmarkError('CA_CERT_MISMATCH', 'the certificate is not a CA certificate');
    const kuExt = cert.extensions.get(EXT.keyUsage);
    if (!kuExt || !decodeKeyUsage(kuExt.value).includes('keyCertSign')) throw new HallmarkError('CA_CERT_MISMATCH', 'the certificate does not allow certificate signing (keyUsage keyCertSign)');
    if (cert.notAfter <= new Date()) throw new HallmarkError('CA_CERT_MISMATCH', 'the certificate has expired');
    const rootRow = await this.#caRow(rootName);
    const subjectText = nameToString(cert.subject);
    await this.store.writeTransaction(async (trx) => {
      await trx.updateTable('certificate_authorities').set({
        status: 'active', parent_id: rootRow.id, certificate_der: der, serial: cert.serialHex.replace(/^00(?=.)/, ''), subject: subjectText,
        not_before: nowIso(cert.notBefore), not_after: nowIso(cert.notAfter), path_len: bc.pathLen ?? null, updated_at: nowIso(),
      }).where('id', '=', pending.id).execute();
      await trx.insertInto('certificates').values({
        issuer_id: rootRow.id, serial: cert.serialHex.replace(/^00(?=.)/, ''), profile: 'intermediate', subject: subjectText, fingerprint_sha256: sha256Fingerprint(der),
        not_before: nowIso(cert.notBefore), not_after: nowIso(cert.notAfter), der, status: 'valid', revoked_at: null, revocation_reason: null,
        requested_by: options.actor, created_at: nowIso(),
      }).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'ca.install', target: pending.name, details: { subject: subjectText, serial: cert.serialHex, fingerprintSha256: sha256Fingerprint(der), notAfter: nowIso(cert.notAfter), default: !!options.makeDefault } }]);
    });
    if (options.makeDefault) {
      this.config.defaultIssuer = pending.name;
      await saveHomeConfig(this.home, this.config);
    }
    this.#issuers.delete(pending.name);
    return (await this.listCas()).find((c) => c.name === pending.name)!;
  }

  /**
   * Revokes a certificate, a device (which may then never enrol again), a batch's or a line's certificates,
   * or everything a CA issued. Emits 'revoked' per issuer once committed, so CRL and OCSP follow at once.
   */
  async revoke(target: RevocationTarget, reason: RevocationReason, actor: string): Promise<RevocationResult> {
    const result = await revokeCertificates(this.store, target, reason, actor);
    for (const event of revokedEvents(result)) {
      const serials = this.#announced.fresh(event.issuerId, event.serials);
      if (serials.length > 0) this.events.emit('revoked', { ...event, serials });
    }
    return result;
  }

  /**
   * Announces revocations made elsewhere (another process, the registry) as 'revoked' events, polling the
   * store every `intervalMs`. Returns the function that stops it. `hallmark serve` runs one.
   */
  watchRevocations(intervalMs = 1000): () => void {
    return watchRevocations(this, this.#announced, intervalMs);
  }

  async audit(events: readonly AuditEvent[]): Promise<void> {
    await this.store.writeTransaction((trx) => appendAudit(trx, events));
  }
}

/** A CSR signed through a Signer (the key may live in a token and never be exported). */
export function csrFromSigner(subject: Buffer, signer: Signer): Promise<Buffer> {
  return createCsrWith(subject, signer.publicKeySpki, signingSchemeFor(signer.ref.algorithm), (data) => signer.sign(data));
}

/** A P-256 device key made by the authority (EST serverkeygen). Async: generation runs on the thread pool. */
function generateDeviceKey(): Promise<{ publicKey: KeyObject; privateKey: KeyObject }> {
  return new Promise((resolve, reject) => generateKeyPair('ec', { namedCurve: 'P-256' }, (err, publicKey, privateKey) => (err ? reject(err) : resolve({ publicKey, privateKey }))));
}

/** What the issuance transaction of a device certificate writes (plain data: it may run in the store's writer thread). */
interface DeviceIssuanceRecord {
  readonly device: DeviceRow;
  readonly batch: BatchRow;
  /** Register `device` first (a key seen for the first time, in a batch that accepts unregistered keys). */
  readonly newDevice: boolean;
  readonly actor: string;
  readonly steps: readonly ProcedureCall[];
  /** The certificates row, in the column order of RECORD_CERTIFICATE_SQL. */
  readonly certificate: readonly unknown[];
  /** The certificate.issue audit entry's details (firstIdentity is added). */
  readonly issueDetails: Readonly<Record<string, unknown>>;
}

const RECORD_CERTIFICATE_SQL = 'insert into certificates (issuer_id, serial, profile, subject, fingerprint_sha256, not_before, not_after, der, status, revoked_at, revocation_reason, requested_by, created_at, device_udid) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)';

/**
 * The issuance transaction of a device certificate: registration on first use, the quota (taken
 * atomically: a concurrent enrolment cannot overdraw it), the steps (a claim's use), the certificate
 * record and its audit entries. Any refusal rolls all of it back (group-commit.ts keeps the others).
 */
async function recordDeviceIssuance(trx: Transaction<Database>, dialect: Dialect, r: DeviceIssuanceRecord, inTransaction?: DeviceIssueRequest['inTransaction']): Promise<{ result: undefined; audit: AuditEvent[] }> {
  const device: DeviceRow = { ...r.device, public_key_spki: asBuffer(r.device.public_key_spki), birth_cert_der: asBuffer(r.device.birth_cert_der) };
  const audit: AuditEvent[] = [];
  if (r.newDevice) audit.push(await Registry.registerOnFirstUse(trx, device, r.actor, dialect));
  const { firstIdentity } = await Registry.reserveIssuance(trx, device, r.batch, dialect);
  audit.push(...(await runCalls(trx, dialect, r.steps)));
  if (inTransaction) audit.push(...((await inTransaction(trx, device, dialect)) ?? []));
  await rawSql(trx, dialect, RECORD_CERTIFICATE_SQL, r.certificate);
  const serial = r.certificate[1] as string;
  audit.push({ actor: r.actor, action: 'certificate.issue', target: serial, details: { ...r.issueDetails, firstIdentity } });
  return { result: undefined, audit };
}

const RECORD_DEVICE_ISSUANCE = defineProcedure(import.meta.url, 'recordDeviceIssuance', (trx, dialect, r: DeviceIssuanceRecord) => recordDeviceIssuance(trx, dialect, r));
