// Station packages for tests, made without the online side: a root (node:crypto key) signs a sub-CA
// certificate for a station key that lives in a SoftHSM2 token (or in node:crypto for tests that need
// no token), with pathLen 0 and critical name constraints permitting the device subject base.

import { createPublicKey, generateKeyPairSync, sign as nodeSign, type KeyObject } from 'node:crypto';
import { join } from 'node:path';
import { extensionsFor, PROFILES } from '../../src/authority/profiles.js';
import { newSerial } from '../../src/authority/certificate-signer.js';
import type { KeyRef, Signer } from '../../src/keys/key-backend.js';
import { Pkcs11KeyBackend } from '../../src/keys/pkcs11-backend.js';
import { keyAlgorithmOf, signingSchemeFor, type KeyAlgorithm } from '../../src/pki/algorithms.js';
import { assembleCertificate, encodeTbsCertificate, parseCertificate } from '../../src/pki/certificate.js';
import { createCsr } from '../../src/pki/csr.js';
import { EXT, basicConstraints, extension, keyIdentifier, stationManifestExtension } from '../../src/pki/extensions.js';
import { ctx, seq } from '../../src/pki/der.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { stationManifestDigest, writeStationPackage, type StationManifest } from '../../src/station/package.js';
import { createSoftHsmToken, type SoftHsmToken } from '../helpers/softhsm.js';

export const BASE = 'O=Acme Devices,OU=thermostat,OU=batch b-0001';

export interface TestCa {
  readonly key: KeyObject;
  readonly spki: Buffer;
  readonly der: Buffer;
  readonly subject: Buffer;
}

const DAY = 86_400_000;

function nodeKey(alg: 'P-256' | 'P-384' | 'ed25519' = 'P-256'): { privateKey: KeyObject; publicKey: KeyObject } {
  return alg === 'ed25519' ? generateKeyPairSync('ed25519') : generateKeyPairSync('ec', { namedCurve: alg });
}

/** A certificate signed with a node:crypto key; `extensions` are DER Extensions. */
function certify(o: { issuer: TestCa | null; issuerKey: KeyObject; subject: Buffer; spki: Buffer; notBefore?: Date; notAfter: Date; extensions: Buffer[] }): Buffer {
  const scheme = signingSchemeFor(keyAlgorithmOf(createPublicKey(o.issuerKey)));
  const tbs = encodeTbsCertificate({
    serial: newSerial(), scheme, issuer: o.issuer ? o.issuer.subject : o.subject,
    notBefore: o.notBefore ?? new Date(Date.now() - 3600_000), notAfter: o.notAfter, subject: o.subject, subjectPublicKeyInfo: o.spki, extensions: o.extensions,
  });
  return assembleCertificate(tbs, scheme, nodeSign(scheme.hash, tbs, o.issuerKey));
}

export function makeRoot(options: { cn?: string; pathLen?: number } = {}): TestCa {
  const { privateKey, publicKey } = nodeKey();
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  const subject = encodeNameString(`CN=${options.cn ?? 'Test Station Root'},O=Acme Devices`);
  const der = certify({
    issuer: null, issuerKey: privateKey, subject, spki, notAfter: new Date(Date.now() + 3650 * DAY),
    extensions: extensionsFor(PROFILES.root, { subjectPublicKeyInfo: spki, subjectKeyKind: 'ecdsa-p256', pathLen: options.pathLen }),
  });
  return { key: privateKey, spki, der, subject };
}

/** An intermediate CA (for chains longer than root → station). */
export function makeIntermediate(root: TestCa, options: { pathLen?: number } = {}): TestCa {
  const { privateKey, publicKey } = nodeKey();
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  const subject = encodeNameString('CN=Test Factory Intermediate,O=Acme Devices');
  const der = certify({
    issuer: root, issuerKey: root.key, subject, spki, notAfter: new Date(Date.now() + 3000 * DAY),
    extensions: extensionsFor(PROFILES.intermediate, { subjectPublicKeyInfo: spki, subjectKeyKind: 'ecdsa-p256', issuerKeyId: keyIdentifier(root.spki), pathLen: options.pathLen ?? 1 }),
  });
  return { key: privateKey, spki, der, subject };
}

export interface StationCertOptions {
  readonly issuer: TestCa;
  readonly stationSpki: Buffer;
  readonly base?: string;
  readonly notAfter?: Date;
  readonly notBefore?: Date;
  /** Default 0; null for no pathLen. */
  readonly pathLen?: number | null;
  /** 'critical' (default), 'none', 'non-critical', or other DNs to permit instead. */
  readonly constraints?: 'critical' | 'none' | 'non-critical' | readonly string[];
  readonly ca?: boolean;
  /** The station manifest digest bound into the certificate (as the root ceremony does); null or absent: none. */
  readonly manifestDigest?: Buffer | null;
}

export function makeStationCertificate(o: StationCertOptions): Buffer {
  const base = o.base ?? BASE;
  const spki = o.stationSpki;
  const kind = keyAlgorithmOf(createPublicKey({ key: spki, format: 'der', type: 'spki' })) as KeyAlgorithm;
  const names = Array.isArray(o.constraints) ? o.constraints.map((n) => encodeNameString(n)) : [encodeNameString(base)];
  const constraints = o.constraints ?? 'critical';
  let extensions = extensionsFor(PROFILES.intermediate, {
    subjectPublicKeyInfo: spki, subjectKeyKind: kind, issuerKeyId: keyIdentifier(o.issuer.spki), pathLen: o.pathLen === null ? undefined : (o.pathLen ?? 0),
    permittedDirectoryNames: constraints === 'none' ? [] : names,
    ...(o.manifestDigest && constraints !== 'none' ? { stationManifestSha256: o.manifestDigest } : {}),
  });
  if (o.manifestDigest && constraints === 'none') extensions.push(stationManifestExtension(o.manifestDigest));
  if (constraints === 'non-critical') {
    extensions = extensions.map((e) => (e.includes(Buffer.from([0x06, 0x03, 0x55, 0x1d, 0x1e])) ? extension(EXT.nameConstraints, false, seq(ctx(0, Buffer.concat(names.map((n) => seq(ctx(4, n))))))) : e));
  }
  if (o.ca === false) extensions = [basicConstraints(false), ...extensions.slice(1)];
  return certify({
    issuer: o.issuer, issuerKey: o.issuer.key, subject: encodeNameString('CN=Station st-1,OU=Factory A,O=Acme Devices'), spki,
    notBefore: o.notBefore, notAfter: o.notAfter ?? new Date(Date.now() + 180 * DAY), extensions,
  });
}

export function manifest(overrides: Partial<Record<keyof StationManifest, unknown>> = {}): StationManifest {
  return {
    format: 'hallmark-station-package', version: 1, stationId: 'st-1', line: 'factory-a', product: 'thermostat', batch: 'b-0001',
    org: 'Acme Devices', quota: 10, validUntil: new Date(Date.now() + 180 * DAY).toISOString(), deviceSubjectBase: BASE,
    deviceValidityDays: 365, devices: null, keyUri: 'pkcs11:token=station;id=%01%02', createdAt: new Date().toISOString(),
    ...overrides,
  } as StationManifest;
}

/** Writes a package directory; the station certificate's notAfter is validUntil. Returns its parts. */
export async function makePackage(dir: string, o: { stationSpki: Buffer; root?: TestCa; manifest?: Partial<Record<keyof StationManifest, unknown>>; cert?: Partial<StationCertOptions>; chain?: Buffer[] }): Promise<{ dir: string; root: TestCa; certificate: Buffer; manifest: StationManifest }> {
  const root = o.root ?? makeRoot();
  const m = manifest(o.manifest);
  // Bound to its manifest, as the root ceremony binds a package made by `hallmark station create`.
  const certificate = makeStationCertificate({ issuer: root, stationSpki: o.stationSpki, base: m.deviceSubjectBase, notAfter: new Date(m.validUntil), manifestDigest: stationManifestDigest(m), ...o.cert });
  await writeStationPackage(dir, { manifest: m, certificate, chain: o.chain ?? [root.der] });
  return { dir, root, certificate, manifest: m };
}

/** A Signer over a node:crypto key (journal tests that need no token). */
export function nodeSigner(privateKey: KeyObject): Signer {
  const publicKey = createPublicKey(privateKey);
  const algorithm = keyAlgorithmOf(publicKey);
  const ref: KeyRef = { backend: 'file', id: 'test', algorithm };
  const scheme = signingSchemeFor(algorithm);
  return { ref, publicKeySpki: publicKey.export({ type: 'spki', format: 'der' }), sign: async (data) => nodeSign(scheme.hash, data, privateKey) };
}

export function nodeStationKey(alg: 'P-256' | 'P-384' | 'ed25519' = 'P-256'): { privateKey: KeyObject; spki: Buffer; signer: Signer } {
  const { privateKey, publicKey } = nodeKey(alg);
  return { privateKey, spki: publicKey.export({ type: 'spki', format: 'der' }), signer: nodeSigner(privateKey) };
}

/** A device CSR (PEM) made by node, and its key's SPKI. */
export function deviceCsr(alg: 'P-256' | 'P-384' | 'ed25519' = 'P-256', cn = 'whatever the device says'): { pem: string; der: Buffer; spki: Buffer; privateKey: KeyObject } {
  const { privateKey, publicKey } = nodeKey(alg);
  const der = createCsr({ subject: encodeNameString(`CN=${cn}`), privateKey, publicKey });
  return { pem: encodePem('CERTIFICATE REQUEST', der), der, spki: publicKey.export({ type: 'spki', format: 'der' }), privateKey };
}

export interface StationToken {
  readonly token: SoftHsmToken;
  readonly keyUri: string;
  readonly spki: Buffer;
}

/** A SoftHSM2 token with a station key pair (generated inside it) and the key's URI. */
export async function createStationToken(label: string, algorithm: KeyAlgorithm = 'ecdsa-p256'): Promise<StationToken> {
  const token = await createSoftHsmToken(label);
  const backend = await Pkcs11KeyBackend.open({ module: token.module, token: token.token, pin: token.pin });
  try {
    const ref = await backend.generateKey(`station-${label}`, algorithm);
    const signer = await backend.signer(ref);
    return { token, keyUri: ref.id, spki: signer.publicKeySpki };
  } finally {
    await backend.close();
  }
}

export const pemOf = (der: Buffer): string => encodePem('CERTIFICATE', der);
export const parsed = (der: Buffer) => parseCertificate(der);
export { join };
