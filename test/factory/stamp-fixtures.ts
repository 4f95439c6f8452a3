// Fixtures for the stamp format, archive and stamp CLI tests: a real CA chain (root and issuing CA,
// P-256, P-384 or Ed25519), real device certificates and keys, and stamps made from them. Not a test
// file itself (no tests are registered here).

import { createHash, createPublicKey, generateKeyPairSync, randomBytes, sign as cryptoSign, type KeyObject } from 'node:crypto';
import type { Signer } from '../../src/keys/key-backend.js';
import { SCHEMES, type KeyAlgorithm, type SignatureScheme } from '../../src/pki/algorithms.js';
import { assembleCertificate, encodeTbsCertificate } from '../../src/pki/certificate.js';
import { authorityKeyIdentifier, basicConstraints, keyIdentifier, keyUsage, subjectKeyIdentifier } from '../../src/pki/extensions.js';
import { encodeNameString } from '../../src/pki/names.js';
import { STAMP_VERSION, onboardingKeyHash16, qrPayloadFor, type Stamp } from '../../src/factory/stamp.js';

const DAY = 86_400_000;

export type CaAlgorithm = Extract<KeyAlgorithm, 'ecdsa-p256' | 'ecdsa-p384' | 'ed25519'>;

export interface Identity {
  readonly subject: string;
  readonly algorithm: CaAlgorithm;
  readonly privateKey: KeyObject;
  readonly spki: Buffer;
  readonly certDer: Buffer;
}

export const spkiOf = (key: KeyObject): Buffer => createPublicKey(key).export({ type: 'spki', format: 'der' });

function keyPair(alg: CaAlgorithm): KeyObject {
  switch (alg) {
    case 'ecdsa-p256': return generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey;
    case 'ecdsa-p384': return generateKeyPairSync('ec', { namedCurve: 'secp384r1' }).privateKey;
    case 'ed25519': return generateKeyPairSync('ed25519').privateKey;
  }
}

const schemeOf = (alg: CaAlgorithm): SignatureScheme => (alg === 'ecdsa-p256' ? SCHEMES.ecdsaSha256 : alg === 'ecdsa-p384' ? SCHEMES.ecdsaSha384 : SCHEMES.ed25519);

/** A certificate over `spki` signed by `issuer` (self-signed when issuer is absent, with `selfKey`). */
export function certificate(options: {
  subject: string; spki: Buffer; ca: boolean; issuer?: Identity; self?: { key: KeyObject; algorithm: CaAlgorithm };
  notBefore?: Date; notAfter?: Date;
}): Buffer {
  const signerAlg = options.issuer?.algorithm ?? options.self!.algorithm;
  const signingKey = options.issuer?.privateKey ?? options.self!.key;
  const scheme = schemeOf(signerAlg);
  const tbs = encodeTbsCertificate({
    serial: randomBytes(16), scheme, issuer: encodeNameString(options.issuer?.subject ?? options.subject),
    notBefore: options.notBefore ?? new Date(Date.now() - DAY), notAfter: options.notAfter ?? new Date(Date.now() + 365 * DAY),
    subject: encodeNameString(options.subject), subjectPublicKeyInfo: options.spki,
    extensions: [
      basicConstraints(options.ca),
      keyUsage(options.ca ? ['keyCertSign', 'cRLSign'] : ['digitalSignature']),
      subjectKeyIdentifier(keyIdentifier(options.spki)),
      authorityKeyIdentifier(keyIdentifier(options.issuer?.spki ?? options.spki)),
    ],
  });
  return assembleCertificate(tbs, scheme, cryptoSign(scheme.hash, tbs, signingKey));
}

/** A CA: self-signed root when `issuer` is absent. */
export function makeCa(subject: string, options: { algorithm?: CaAlgorithm; issuer?: Identity; notBefore?: Date; notAfter?: Date; ca?: boolean } = {}): Identity {
  const algorithm = options.algorithm ?? 'ecdsa-p256';
  const privateKey = keyPair(algorithm);
  const spki = spkiOf(privateKey);
  const certDer = certificate({ subject, spki, ca: options.ca ?? true, issuer: options.issuer, self: { key: privateKey, algorithm }, notBefore: options.notBefore, notAfter: options.notAfter });
  return { subject, algorithm, privateKey, spki, certDer };
}

/** A Signer over an identity's key, as a key backend hands one out. */
export function signerOf(id: Identity): Signer {
  const hash = schemeOf(id.algorithm).hash;
  return { ref: { backend: 'file', id: `memory-${id.subject}`, algorithm: id.algorithm }, publicKeySpki: id.spki, sign: async (data) => cryptoSign(hash, data, id.privateKey) };
}

export interface Pki { readonly root: Identity; readonly issuing: Identity }

export function makePki(algorithm: CaAlgorithm = 'ecdsa-p256', name = 'Test'): Pki {
  const root = makeCa(`CN=${name} Root CA,O=${name} Org`, { algorithm });
  const issuing = makeCa(`CN=${name} Issuing CA 1,O=${name} Org`, { algorithm, issuer: root });
  return { root, issuing };
}

/** A complete stamp with real keys: a P-256 device key certified by the issuing CA, an X25519 onboarding key. */
export function makeStamp(pki: Pki, options: { serial?: string; withDeviceKey?: boolean; withOnboardingKey?: boolean; product?: string } = {}): Stamp {
  const device = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey;
  const deviceSpki = spkiOf(device);
  const udid = createHash('sha256').update(deviceSpki).digest('hex');
  const serialNumber = options.serial ?? `SN-${randomBytes(4).toString('hex').toUpperCase()}`;
  const product = options.product ?? 'Thermostat, "Pro" edition';
  const certDer = certificate({ subject: `CN=${udid},O=Test Org`, spki: deviceSpki, ca: false, issuer: pki.issuing });
  const onboarding = generateKeyPairSync('x25519').privateKey;
  const onboardingSpki = spkiOf(onboarding);
  const popSecret = randomBytes(16);
  return {
    version: STAMP_VERSION,
    serialNumber,
    udid,
    company: 'Test Org',
    product,
    batch: 'b-2024-07',
    ...(options.withDeviceKey === false ? {} : { devicePrivateKeyPkcs8: device.export({ type: 'pkcs8', format: 'der' }) }),
    certificateDer: certDer,
    chainDer: [pki.issuing.certDer, pki.root.certDer],
    popSecret,
    onboardingPublicKeySpki: onboardingSpki,
    ...(options.withOnboardingKey === false ? {} : { onboardingPrivateKeyPkcs8: onboarding.export({ type: 'pkcs8', format: 'der' }) }),
    qrPayload: qrPayloadFor(serialNumber, product, popSecret, onboardingKeyHash16(onboardingSpki)),
  };
}
