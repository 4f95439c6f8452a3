// Fixtures for manifest tests: signers and vendor CAs with real certificates, device keys, Microchip
// style JWS manifests and generic lists made on the fly, and a registry with a batch to import into.
// Not a test file itself.

import { createHash, createPublicKey, generateKeyPairSync, randomBytes, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SCHEMES } from '../../../src/pki/algorithms.js';
import { assembleCertificate, encodeTbsCertificate } from '../../../src/pki/certificate.js';
import { authorityKeyIdentifier, basicConstraints, keyIdentifier, keyUsage, subjectKeyIdentifier } from '../../../src/pki/extensions.js';
import { encodeNameString } from '../../../src/pki/names.js';
import { encodePem } from '../../../src/pki/pem.js';
import { registryFor } from '../../../src/registry/birth-certificates.js';
import type { Registry } from '../../../src/registry/registry.js';
import { nowIso, type Store } from '../../../src/store/database.js';

/** Copies of ../shared/vectors files kept beside the tests (vectors/README.md), so a fresh clone has them. */
export const VECTORS = join(import.meta.dirname, '..', '..', '..', '..', 'test', 'registry', 'manifests', 'vectors');
export const MCHP = join(VECTORS, 'microchip');
export const SIGNER_5 = join(MCHP, 'mchp_verifiers', 'MCHP_manifest_signer_5_Mar_6-2024_noExpiration.crt');
export const SIGNER_2 = join(MCHP, 'mchp_verifiers', 'MCHP_manifest_signer_2_Aug-15-2019_Aug-15-2020.crt');
export const ROOT_CA_002 = join(MCHP, 'pytrustplatform', 'Crypto_Authentication_Root_CA_002.crt');

const DAY = 86_400_000;

export interface Identity {
  readonly privateKey: KeyObject;
  readonly spki: Buffer;
  readonly certDer: Buffer;
  readonly certPem: string;
  readonly subject: string;
}

export const spkiOf = (key: KeyObject): Buffer => createPublicKey(key).export({ type: 'spki', format: 'der' });

/** A certificate over `spki`, signed by `issuer` (or self-signed with `selfKey`). */
export function makeCertificate(options: {
  subject: string; spki: Buffer; ca: boolean; issuer?: Identity; selfKey?: KeyObject; notBefore?: Date; notAfter?: Date;
}): Buffer {
  const issuerName = encodeNameString(options.issuer?.subject ?? options.subject);
  const signingKey = options.issuer?.privateKey ?? options.selfKey!;
  const issuerSpki = options.issuer?.spki ?? options.spki;
  const tbs = encodeTbsCertificate({
    serial: randomBytes(16), scheme: SCHEMES.ecdsaSha256, issuer: issuerName,
    notBefore: options.notBefore ?? new Date(Date.now() - DAY), notAfter: options.notAfter ?? new Date(Date.now() + 3650 * DAY),
    subject: encodeNameString(options.subject), subjectPublicKeyInfo: options.spki,
    extensions: [
      basicConstraints(options.ca),
      keyUsage(options.ca ? ['keyCertSign', 'cRLSign'] : ['digitalSignature']),
      subjectKeyIdentifier(keyIdentifier(options.spki)),
      authorityKeyIdentifier(keyIdentifier(issuerSpki)),
    ],
  });
  return assembleCertificate(tbs, SCHEMES.ecdsaSha256, cryptoSign('sha256', tbs, signingKey));
}

/** A P-256 identity with a certificate: a manifest signer (end entity) or a vendor CA. */
export function makeIdentity(subject: string, options: { ca?: boolean; issuer?: Identity; notBefore?: Date; notAfter?: Date; ed25519?: boolean } = {}): Identity {
  const { privateKey } = options.ed25519 ? generateKeyPairSync('ed25519') : generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = spkiOf(privateKey);
  const certDer = options.ed25519 ? Buffer.alloc(0) : makeCertificate({ subject, spki, ca: options.ca ?? false, issuer: options.issuer, selfKey: privateKey, notBefore: options.notBefore, notAfter: options.notAfter });
  return { privateKey, spki, certDer, certPem: options.ed25519 ? '' : encodePem('CERTIFICATE', certDer), subject };
}

export interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly x: string; readonly y: string; readonly udid: string }

export function deviceKey(): DeviceKey {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = privateKey.export({ format: 'jwk' });
  const spki = spkiOf(privateKey);
  return { privateKey, spki, x: jwk.x!, y: jwk.y!, udid: createHash('sha256').update(spki).digest('hex') };
}

/** A Microchip-style JWS entry (general JSON serialisation) signed ES256 by `signer`. */
export function microchipEntry(signer: Identity, payload: Record<string, unknown>, options: { header?: Record<string, unknown>; unprotected?: Record<string, unknown> } = {}): Record<string, unknown> {
  const protectedHeader = options.header ?? {
    alg: 'ES256', kid: keyIdentifier(signer.spki).toString('base64url'), typ: 'JWT',
    'x5t#S256': createHash('sha256').update(signer.certDer).digest('base64url'),
  };
  const p = Buffer.from(JSON.stringify(protectedHeader)).toString('base64url');
  const body = Buffer.from(JSON.stringify(payload)).toString('base64url');
  const signature = cryptoSign('sha256', Buffer.from(`${p}.${body}`), { key: signer.privateKey, dsaEncoding: 'ieee-p1363' }).toString('base64url');
  return { payload: body, protected: p, header: options.unprotected ?? { uniqueId: payload.uniqueId }, signature };
}

/** A TNGTLS-like payload: device key kid "0" (with x5c when given) and four more keys. */
export function microchipPayload(uniqueId: string, key: { x: string; y: string }, x5c?: readonly Buffer[]): Record<string, unknown> {
  const extra = [1, 2, 3, 4].map((kid) => { const k = deviceKey(); return { kid: String(kid), kty: 'EC', crv: 'P-256', x: k.x, y: k.y }; });
  return {
    version: 1, model: 'ATECC608B', partNumber: 'ATECC608B-TNGTLSU-TEST', uniqueId, provisioningTimestamp: new Date().toISOString(),
    publicKeySet: { keys: [{ kid: '0', kty: 'EC', crv: 'P-256', x: key.x, y: key.y, ...(x5c ? { x5c: x5c.map((c) => c.toString('base64')) } : {}) }, ...extra] },
  };
}

export const randomUniqueId = (): string => `0123${randomBytes(7).toString('hex')}`;

export function writeJson(dir: string, name: string, value: unknown): string {
  const path = join(dir, name);
  writeFileSync(path, JSON.stringify(value, null, 2));
  return path;
}

/** A generic list line's fields. */
export interface ListRow { udid?: string; explicit_udid?: string; public_key?: string; serial?: string; birth_cert?: string; birth_chain?: string; tenant?: string }

export function csvText(columns: readonly string[], rows: readonly ListRow[]): string {
  const esc = (v: string): string => (/[",]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v);
  return [columns.join(','), ...rows.map((r) => columns.map((c) => esc((r as Record<string, string | undefined>)[c] ?? '')).join(','))].join('\n') + '\n';
}

export const ndjsonText = (rows: readonly ListRow[]): string => rows.map((r) => JSON.stringify(r)).join('\n') + '\n';

/** Signs `path` as `hallmark manifest sign` does and writes `${path}.sig`. */
export function signList(path: string, content: string | Buffer, signer: KeyObject): void {
  writeFileSync(path, content);
  const ed = signer.asymmetricKeyType === 'ed25519';
  writeFileSync(`${path}.sig`, cryptoSign(ed ? null : 'sha256', Buffer.from(content), signer));
}

/** A registry over `store` with one product, line (on a stand-in CA row) and batch; returns the batch id. */
export async function registryWithBatch(store: Store, suffix = ''): Promise<{ registry: Registry; batch: string; newBatch: () => Promise<string> }> {
  const now = nowIso();
  const ca = `ca${suffix}-${randomBytes(3).toString('hex')}`;
  await store.db.insertInto('certificate_authorities').values({
    name: ca, role: 'intermediate', parent_id: null, status: 'active', subject: `CN=${ca}`, key_ref: null, key_algorithm: 'ecdsa-p256',
    ski: randomBytes(20).toString('hex'), path_len: null, certificate_der: null, csr_der: null, serial: null, not_before: null, not_after: null,
    created_at: now, updated_at: now,
  }).execute();
  const registry = registryFor(store);
  const product = `p${suffix}-${randomBytes(3).toString('hex')}`;
  const line = `l${suffix}-${randomBytes(3).toString('hex')}`;
  await registry.createProduct({ name: product, actor: 'test' });
  await registry.createLine({ name: line, ca, actor: 'test' });
  const newBatch = () => registry.createBatch({ product, line, quota: 1000, actor: 'test' });
  return { registry, batch: await newBatch(), newBatch };
}

export async function countDevices(store: Store, batch?: string): Promise<number> {
  let q = store.db.selectFrom('devices').select((eb) => eb.fn.countAll().as('n'));
  if (batch) q = q.where('batch_id', '=', batch);
  return Number((await q.executeTakeFirstOrThrow()).n);
}

export async function countAudit(store: Store, action?: string): Promise<number> {
  let q = store.db.selectFrom('audit_log').select((eb) => eb.fn.countAll().as('n'));
  if (action) q = q.where('action', '=', action);
  return Number((await q.executeTakeFirstOrThrow()).n);
}
