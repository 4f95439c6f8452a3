// A device stamp: everything a connected factory flashes into one device (issue 6, "Company B").
// The authority makes it (src/authority/stamping.ts); formats in src/factory/formats/ encode it, one
// file per format, all behind the StampFormat interface; `hallmark stamp inspect` decodes any of them.

import { createHash, createPrivateKey, createPublicKey, type KeyObject } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { MAX_CERTIFICATE_BYTES, parseCertificate, type ParsedCertificate } from '../pki/certificate.js';

export const STAMP_VERSION = 1;

export interface Stamp {
  readonly version: typeof STAMP_VERSION;
  /** The device's serial number (printed on the label; unique in the registry). */
  readonly serialNumber: string;
  /** The registry's device identifier (hex SHA-256 of the device key for authority-made keys). */
  readonly udid: string;
  /** Company (the authority's organisation) and product name. */
  readonly company: string;
  readonly product: string;
  readonly batch: string;
  /** The device key pair as PKCS#8 DER, when the authority made it (the device cannot make its own). */
  readonly devicePrivateKeyPkcs8?: Buffer;
  /** The operational certificate (DER). */
  readonly certificateDer: Buffer;
  /** The issuing chain, issuer first, root last (DER). */
  readonly chainDer: readonly Buffer[];
  /** Proof-of-possession secret for app-based onboarding (random; also in the QR payload). */
  readonly popSecret: Buffer;
  /** The onboarding key pair (X25519): a second key, used only by app-based onboarding. SPKI DER and PKCS#8 DER. */
  readonly onboardingPublicKeySpki: Buffer;
  readonly onboardingPrivateKeyPkcs8?: Buffer;
  /** The text the device label's barcode / QR code carries. */
  readonly qrPayload: string;
}

/** One way to write a stamp to a file (json, tlv, nvs). */
export interface StampFormat {
  readonly name: 'json' | 'tlv' | 'nvs';
  /** File name extension, with the dot. */
  readonly extension: string;
  encode(stamp: Stamp): Buffer;
  /** Decodes and checks a file of this format; throws STAMP_INVALID naming what is wrong. */
  decode(data: Buffer): Stamp;
  /** Whether these bytes look like this format (for `stamp inspect` without --format). */
  sniff(data: Buffer): boolean;
}

/**
 * The QR / barcode payload: `HM1:` then dot-separated base32 (RFC 4648, no padding, upper case,
 * QR alphanumeric mode) fields: serial number (UTF-8), product (UTF-8), PoP secret, SHA-256 of the
 * onboarding public key's SPKI truncated to 16 bytes. An onboarding app reads it, proves knowledge
 * of the PoP secret to the device and pins the onboarding key.
 */
export function qrPayloadFor(serialNumber: string, product: string, popSecret: Buffer, onboardingKeyHash16: Buffer): string {
  return `HM1:${[Buffer.from(serialNumber, 'utf8'), Buffer.from(product, 'utf8'), popSecret, onboardingKeyHash16].map(base32).join('.')}`;
}

const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';

export function base32(data: Buffer): string {
  let out = '';
  let bits = 0;
  let value = 0;
  for (const byte of data) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += ALPHABET[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
    value &= (1 << bits) - 1;
  }
  if (bits > 0) out += ALPHABET[(value << (5 - bits)) & 31];
  return out;
}

export function base32Decode(text: string): Buffer {
  const out: number[] = [];
  let bits = 0;
  let value = 0;
  for (const ch of text) {
    const v = ALPHABET.indexOf(ch);
    if (v < 0) throw new RangeError(`not base32: ${JSON.stringify(ch)}`);
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
    value &= (1 << bits) - 1;
  }
  return Buffer.from(out);
}

// ---------------------------------------------------------------- checks shared by every format

/** Limits on stamp fields; every format refuses anything larger before it decodes it. */
export const STAMP_LIMITS = {
  /** Company, product and batch names (characters). */
  text: 256,
  /** Serial numbers are label text: the registry allows 1-64 characters. */
  serialNumber: 64,
  /** Certificates in the issuing chain. */
  chain: 8,
  /** A PKCS#8 or SPKI key (DER). RSA-8192 PKCS#8 is under 5 KiB. */
  key: 8 * 1024,
  /** PoP secret: at least 128 bits, so that it cannot be guessed during onboarding. */
  popSecretMin: 16,
  popSecretMax: 64,
  qrPayload: 1024,
} as const;

/** The error every stamp decoder throws: `where` names the file kind, `what` the field or record. */
export function stampInvalid(where: string, what: string, cause?: unknown): HallmarkError {
  return new HallmarkError('STAMP_INVALID', `${where}: ${what}`, cause === undefined ? undefined : { cause });
}

// No control characters (C0, DEL, C1): these strings end up on labels, in CSV files and in NVS strings.
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
const UDID_HEX = /^(?:[0-9a-f]{2}){1,32}$/;

function checkText(where: string, what: string, value: unknown, max: number): void {
  if (typeof value !== 'string' || value.length === 0) throw stampInvalid(where, `${what} is missing or empty`);
  if (value.length > max) throw stampInvalid(where, `${what} is longer than ${max} characters`);
  if (CONTROL.test(value)) throw stampInvalid(where, `${what} contains a control character`);
  if (value.includes('\ufffd')) throw stampInvalid(where, `${what} is not valid UTF-8`);
}

function checkBuffer(where: string, what: string, value: unknown, max: number): asserts value is Buffer {
  if (!Buffer.isBuffer(value)) throw stampInvalid(where, `${what} is missing`);
  if (value.length === 0) throw stampInvalid(where, `${what} is empty`);
  if (value.length > max) throw stampInvalid(where, `${what} is ${value.length} bytes, over the ${max}-byte limit`);
}

function parseCert(where: string, what: string, der: Buffer): ParsedCertificate {
  checkBuffer(where, what, der, MAX_CERTIFICATE_BYTES);
  try {
    return parseCertificate(der);
  } catch (err) {
    throw stampInvalid(where, `${what} is not a DER certificate (${(err as Error).message})`, err);
  }
}

function canonicalSpki(spki: Buffer): Buffer {
  return createPublicKey({ key: spki, format: 'der', type: 'spki' }).export({ type: 'spki', format: 'der' });
}

function publicOfPkcs8(where: string, what: string, der: Buffer): KeyObject {
  checkBuffer(where, what, der, STAMP_LIMITS.key);
  try {
    return createPublicKey(createPrivateKey({ key: der, format: 'der', type: 'pkcs8' }));
  } catch (err) {
    // The error of OpenSSL's decoder says nothing about the key bytes, but keep it out of the message anyway.
    throw stampInvalid(where, `${what} is not a PKCS#8 DER private key`, err);
  }
}

/** The SHA-256 of the onboarding key's SPKI, truncated to 16 bytes: what the QR payload pins. */
export function onboardingKeyHash16(onboardingPublicKeySpki: Buffer): Buffer {
  return createHash('sha256').update(onboardingPublicKeySpki).digest().subarray(0, 16);
}

// Stamps the authority has just assembled from the key pairs it generated and the certificate it signed
// for them (src/authority/stamping.ts) are consistent by construction. Re-deriving both public keys from
// their PKCS#8 (an EC scalar multiplication each), parsing three certificates and rebuilding the QR
// payload cost ~0.3 ms of event-loop time per stamp and format, more than the signature: the generator
// marks its stamps and every encode() skips the check for them. Decoding always checks in full.
const madeByAuthority = new WeakSet<Stamp>();

/** Marks a stamp the authority has just built from keys it generated and the certificate it signed for them. */
export function madeByThisAuthority(stamp: Stamp): Stamp {
  madeByAuthority.add(stamp);
  return stamp;
}

/**
 * Checks a stamp field by field: what every format's decode() runs before it returns a stamp (so no
 * format ever hands out a partial or inconsistent one) and encode() runs before it writes one.
 * Checks structure and consistency (DER certificates, keys that parse, the device key matching the
 * certificate, the QR payload matching the PoP secret and onboarding key), not signatures or dates.
 * Throws STAMP_INVALID naming the field; `where` says which file it came from.
 */
export function checkStamp(stamp: Stamp, where = 'stamp'): void {
  if (madeByAuthority.has(stamp)) return;
  if (stamp.version !== STAMP_VERSION) throw stampInvalid(where, `stamp version ${String(stamp.version)} is not supported (expected ${STAMP_VERSION})`);
  checkText(where, 'serial number', stamp.serialNumber, STAMP_LIMITS.serialNumber);
  if (typeof stamp.udid !== 'string' || !UDID_HEX.test(stamp.udid)) throw stampInvalid(where, 'UDID is not 1-32 bytes of lower-case hex');
  checkText(where, 'company', stamp.company, STAMP_LIMITS.text);
  checkText(where, 'product', stamp.product, STAMP_LIMITS.text);
  checkText(where, 'batch', stamp.batch, STAMP_LIMITS.text);
  const cert = parseCert(where, 'certificate', stamp.certificateDer);
  if (!Array.isArray(stamp.chainDer)) throw stampInvalid(where, 'chain is missing');
  if (stamp.chainDer.length > STAMP_LIMITS.chain) throw stampInvalid(where, `chain has ${stamp.chainDer.length} certificates, over the limit of ${STAMP_LIMITS.chain}`);
  stamp.chainDer.forEach((der, i) => parseCert(where, `chain certificate ${i + 1}`, der));
  if (stamp.devicePrivateKeyPkcs8 !== undefined) {
    const pub = publicOfPkcs8(where, 'device private key', stamp.devicePrivateKeyPkcs8);
    let certKey: Buffer;
    try { certKey = canonicalSpki(cert.subjectPublicKeyInfo); } catch (err) { throw stampInvalid(where, 'certificate public key cannot be read', err); }
    if (!pub.export({ type: 'spki', format: 'der' }).equals(certKey)) throw stampInvalid(where, 'device private key does not match the certificate public key');
  }
  checkBuffer(where, 'PoP secret', stamp.popSecret, STAMP_LIMITS.popSecretMax);
  if (stamp.popSecret.length < STAMP_LIMITS.popSecretMin) throw stampInvalid(where, `PoP secret is ${stamp.popSecret.length} bytes, under the ${STAMP_LIMITS.popSecretMin}-byte minimum`);
  checkBuffer(where, 'onboarding public key', stamp.onboardingPublicKeySpki, STAMP_LIMITS.key);
  let onboarding: KeyObject;
  try { onboarding = createPublicKey({ key: stamp.onboardingPublicKeySpki, format: 'der', type: 'spki' }); } catch (err) { throw stampInvalid(where, 'onboarding public key is not an SPKI DER public key', err); }
  if (onboarding.asymmetricKeyType !== 'x25519') throw stampInvalid(where, `onboarding public key is ${onboarding.asymmetricKeyType}, not X25519`);
  if (stamp.onboardingPrivateKeyPkcs8 !== undefined) {
    const pub = publicOfPkcs8(where, 'onboarding private key', stamp.onboardingPrivateKeyPkcs8);
    if (!pub.export({ type: 'spki', format: 'der' }).equals(onboarding.export({ type: 'spki', format: 'der' }))) throw stampInvalid(where, 'onboarding private key does not match the onboarding public key');
  }
  checkText(where, 'QR payload', stamp.qrPayload, STAMP_LIMITS.qrPayload);
  // The label must let an onboarding app prove the PoP secret and pin this onboarding key: a payload
  // made for another device (or with another secret) is a stamp that cannot be onboarded.
  if (stamp.qrPayload !== qrPayloadFor(stamp.serialNumber, stamp.product, stamp.popSecret, onboardingKeyHash16(stamp.onboardingPublicKeySpki))) {
    throw stampInvalid(where, 'QR payload does not match the serial number, product, PoP secret and onboarding key');
  }
}
