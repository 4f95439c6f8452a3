// A device stamp: everything a connected factory flashes into one device (issue 6, "Company B").
// The authority makes it (src/authority/stamping.ts); formats in src/factory/formats/ encode it, one
// file per format, all behind the StampFormat interface; `hallmark stamp inspect` decodes any of them.

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
