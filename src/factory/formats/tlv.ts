// The tlv stamp format: a binary stamp partition image, in the spirit of Espressif's esp_secure_cert
// partition, for firmware that reads its identity straight from flash without a JSON or CSV parser.
//
// Layout (all integers little-endian: every target MCU - ESP32, Cortex-M, RISC-V - is little-endian,
// so firmware can memcpy them; fields are not aligned, read them with memcpy or byte by byte):
//
//   Header, 32 bytes
//     offset  size  field
//     0x00    8     magic: ASCII "HMSTAMP" followed by one NUL byte (48 4d 53 54 41 4d 50 00)
//     0x08    2     format version: 1
//     0x0a    2     header length: 32 (a reader of version 1 refuses anything else)
//     0x0c    4     record count (at most 64)
//     0x10    4     total image length in bytes: header plus every record (at most 65536)
//     0x14    8     reserved, zero
//     0x1c    4     CRC32 of bytes 0x00..0x1b
//
//   Then `record count` records, back to back, no padding:
//     0       2     type (table below)
//     2       4     value length L
//     6       L     value
//     6+L     4     CRC32 of the 6 + L bytes before it (type, length and value)
//
//   The image ends exactly at `total length`. When the image is read back from a flash partition the
//   bytes after it are erased flash (0xff) and are ignored; any other byte after it is refused.
//
// CRC32 is the common one (IEEE 802.3, reflected polynomial 0xedb88320, initial value and final
// XOR 0xffffffff): zlib's crc32(), esp_rom_crc32_le(0, ...) on ESP32, Python's zlib.crc32.
//
// Record types:
//     0x0001  serial number           UTF-8 text, no terminator
//     0x0002  UDID                    ASCII lower-case hex text
//     0x0003  company                 UTF-8 text
//     0x0004  product                 UTF-8 text
//     0x0005  batch                   UTF-8 text
//     0x0010  certificate             the device's operational certificate, DER
//     0x0011  chain certificate       DER; one record per certificate, issuer first, root last
//     0x0020  device private key      PKCS#8 DER (absent when the device makes its own key)
//     0x0030  PoP secret              raw bytes (16-64)
//     0x0031  onboarding public key   X25519 SubjectPublicKeyInfo DER
//     0x0032  onboarding private key  X25519 PKCS#8 DER (optional)
//     0x0040  QR payload              ASCII text (the label's QR code content)
//   Every type except 0x0011 appears at most once. Unknown types: a type with its top bit set
//   (0x8000-0xffff) is optional and skipped (after its CRC is checked), so a later version can add
//   information old firmware may ignore; an unknown type below 0x8000 is refused, because it may
//   carry something the device needs (the rule PNG uses for its ancillary chunks).
//
// docs/stamp-formats.md carries the same table for firmware engineers.

import * as zlib from 'node:zlib';
import { parseCertificate } from '../../pki/certificate.js';
import { STAMP_LIMITS, STAMP_VERSION, checkStamp, stampInvalid, type Stamp, type StampFormat } from '../stamp.js';

export const TLV_MAGIC = Buffer.from('HMSTAMP\0', 'latin1');
export const TLV_VERSION = 1;
export const TLV_HEADER_BYTES = 32;
/** Largest image: a stamp is a few KiB; 64 KiB leaves room for long chains and fits any stamp partition. */
export const MAX_TLV_IMAGE_BYTES = 64 * 1024;
/** Largest input decode() reads: an image plus erased flash after it (a dump of a whole partition). */
export const MAX_TLV_INPUT_BYTES = 1024 * 1024;
export const MAX_TLV_RECORDS = 64;
/** Types with this bit set may be skipped by a reader that does not know them. */
export const TLV_OPTIONAL_TYPE_BIT = 0x8000;

export const TLV_TYPES = {
  serialNumber: 0x0001,
  udid: 0x0002,
  company: 0x0003,
  product: 0x0004,
  batch: 0x0005,
  certificate: 0x0010,
  chainCertificate: 0x0011,
  devicePrivateKey: 0x0020,
  popSecret: 0x0030,
  onboardingPublicKey: 0x0031,
  onboardingPrivateKey: 0x0032,
  qrPayload: 0x0040,
} as const;

/** Names used in error messages ("record 7 (certificate) fails its CRC32"). */
export const TLV_TYPE_NAMES: ReadonlyMap<number, string> = new Map([
  [TLV_TYPES.serialNumber, 'serial number'],
  [TLV_TYPES.udid, 'UDID'],
  [TLV_TYPES.company, 'company'],
  [TLV_TYPES.product, 'product'],
  [TLV_TYPES.batch, 'batch'],
  [TLV_TYPES.certificate, 'certificate'],
  [TLV_TYPES.chainCertificate, 'chain certificate'],
  [TLV_TYPES.devicePrivateKey, 'device private key'],
  [TLV_TYPES.popSecret, 'PoP secret'],
  [TLV_TYPES.onboardingPublicKey, 'onboarding public key'],
  [TLV_TYPES.onboardingPrivateKey, 'onboarding private key'],
  [TLV_TYPES.qrPayload, 'QR payload'],
]);

const WHERE = 'tlv stamp';

// ---------------------------------------------------------------- CRC32

// zlib.crc32 exists from Node 20.15 / 22.2 on; package.json allows any Node 20, so older ones get a
// table-driven CRC32 with the same polynomial (both give the zlib / IEEE 802.3 value).
const nativeCrc32 = (zlib as unknown as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;

let table: Uint32Array | undefined;
function tableCrc32(data: Uint8Array): number {
  if (!table) {
    table = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      table[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (let i = 0; i < data.length; i++) crc = table[(crc ^ data[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** CRC32 (IEEE 802.3 / zlib) of `data`, as an unsigned 32-bit number. */
export function crc32(data: Uint8Array): number {
  return nativeCrc32 ? nativeCrc32(data) >>> 0 : tableCrc32(data);
}

/** Exposed for the test that checks the fallback gives zlib's values. */
export const crc32Fallback = tableCrc32;

// ---------------------------------------------------------------- encode

function record(type: number, value: Buffer): Buffer {
  const out = Buffer.alloc(6 + value.length + 4);
  out.writeUInt16LE(type, 0);
  out.writeUInt32LE(value.length, 2);
  value.copy(out, 6);
  out.writeUInt32LE(crc32(out.subarray(0, 6 + value.length)), 6 + value.length);
  return out;
}

function encode(stamp: Stamp): Buffer {
  checkStamp(stamp, WHERE);
  const text = (s: string) => Buffer.from(s, 'utf8');
  const records: Buffer[] = [
    record(TLV_TYPES.serialNumber, text(stamp.serialNumber)),
    record(TLV_TYPES.udid, text(stamp.udid)),
    record(TLV_TYPES.company, text(stamp.company)),
    record(TLV_TYPES.product, text(stamp.product)),
    record(TLV_TYPES.batch, text(stamp.batch)),
    record(TLV_TYPES.certificate, stamp.certificateDer),
    ...stamp.chainDer.map((der) => record(TLV_TYPES.chainCertificate, der)),
    ...(stamp.devicePrivateKeyPkcs8 ? [record(TLV_TYPES.devicePrivateKey, stamp.devicePrivateKeyPkcs8)] : []),
    record(TLV_TYPES.popSecret, stamp.popSecret),
    record(TLV_TYPES.onboardingPublicKey, stamp.onboardingPublicKeySpki),
    ...(stamp.onboardingPrivateKeyPkcs8 ? [record(TLV_TYPES.onboardingPrivateKey, stamp.onboardingPrivateKeyPkcs8)] : []),
    record(TLV_TYPES.qrPayload, text(stamp.qrPayload)),
  ];
  const total = TLV_HEADER_BYTES + records.reduce((n, r) => n + r.length, 0);
  if (total > MAX_TLV_IMAGE_BYTES) throw stampInvalid(WHERE, `the stamp needs ${total} bytes, over the ${MAX_TLV_IMAGE_BYTES}-byte image limit`);
  const header = Buffer.alloc(TLV_HEADER_BYTES);
  TLV_MAGIC.copy(header, 0);
  header.writeUInt16LE(TLV_VERSION, 0x08);
  header.writeUInt16LE(TLV_HEADER_BYTES, 0x0a);
  header.writeUInt32LE(records.length, 0x0c);
  header.writeUInt32LE(total, 0x10);
  header.writeUInt32LE(crc32(header.subarray(0, 0x1c)), 0x1c);
  return Buffer.concat([header, ...records], total);
}

// ---------------------------------------------------------------- decode

const utf8 = new TextDecoder('utf-8', { fatal: true });

const hex4 = (n: number) => `0x${n.toString(16).padStart(4, '0')}`;

function recordName(index: number, type: number, offset: number): string {
  const name = TLV_TYPE_NAMES.get(type) ?? `unknown type ${hex4(type)}`;
  return `record ${index} (${name}, type ${hex4(type)}, at offset ${offset})`;
}

function decode(data: Buffer): Stamp {
  if (data.length > MAX_TLV_INPUT_BYTES) throw stampInvalid(WHERE, `file is ${data.length} bytes, over the ${MAX_TLV_INPUT_BYTES}-byte limit`);
  if (data.length < TLV_HEADER_BYTES) throw stampInvalid(WHERE, `truncated: ${data.length} bytes, shorter than the ${TLV_HEADER_BYTES}-byte header`);
  if (!data.subarray(0, 8).equals(TLV_MAGIC)) throw stampInvalid(WHERE, 'bad magic: not a Hallmark TLV stamp (expected "HMSTAMP\\0")');
  if (data.readUInt32LE(0x1c) !== crc32(data.subarray(0, 0x1c))) throw stampInvalid(WHERE, 'the header fails its CRC32');
  const version = data.readUInt16LE(0x08);
  if (version !== TLV_VERSION) throw stampInvalid(WHERE, `format version ${version} is not supported (expected ${TLV_VERSION})`);
  const headerLength = data.readUInt16LE(0x0a);
  if (headerLength !== TLV_HEADER_BYTES) throw stampInvalid(WHERE, `header length ${headerLength} is not ${TLV_HEADER_BYTES}`);
  if (data.readUInt32LE(0x14) !== 0 || data.readUInt32LE(0x18) !== 0) throw stampInvalid(WHERE, 'reserved header bytes are not zero');
  const count = data.readUInt32LE(0x0c);
  if (count > MAX_TLV_RECORDS) throw stampInvalid(WHERE, `${count} records, over the limit of ${MAX_TLV_RECORDS}`);
  const total = data.readUInt32LE(0x10);
  if (total > MAX_TLV_IMAGE_BYTES) throw stampInvalid(WHERE, `the header says ${total} bytes, over the ${MAX_TLV_IMAGE_BYTES}-byte image limit`);
  if (total < TLV_HEADER_BYTES) throw stampInvalid(WHERE, `the header says ${total} bytes, shorter than the header itself`);
  if (total > data.length) throw stampInvalid(WHERE, `truncated: the header says ${total} bytes, the file has ${data.length}`);
  for (let i = total; i < data.length; i++) {
    if (data[i] !== 0xff) throw stampInvalid(WHERE, `unexpected byte at offset ${i}, after the image's ${total} bytes (only erased flash, 0xff, may follow)`);
  }

  const single = new Map<number, Buffer>();
  const chainDer: Buffer[] = [];
  let offset = TLV_HEADER_BYTES;
  for (let i = 1; i <= count; i++) {
    if (offset + 6 > total) throw stampInvalid(WHERE, `truncated: record ${i} of ${count} starts at offset ${offset}, past the end of the image`);
    const type = data.readUInt16LE(offset);
    const length = data.readUInt32LE(offset + 2);
    const name = recordName(i, type, offset);
    if (length > total - offset - 10) throw stampInvalid(WHERE, `${name} says ${length} bytes, past the end of the image`);
    const end = offset + 6 + length;
    if (data.readUInt32LE(end) !== crc32(data.subarray(offset, end))) throw stampInvalid(WHERE, `${name} fails its CRC32`);
    // A copy: the stamp must not keep (or alias) the whole input buffer.
    const value = Buffer.from(data.subarray(offset + 6, end));
    offset = end + 4;
    if (type === TLV_TYPES.chainCertificate) {
      if (chainDer.length >= STAMP_LIMITS.chain) throw stampInvalid(WHERE, `${name}: more than ${STAMP_LIMITS.chain} chain certificates`);
      chainDer.push(value);
    } else if (TLV_TYPE_NAMES.has(type)) {
      if (single.has(type)) throw stampInvalid(WHERE, `${name} appears a second time`);
      single.set(type, value);
    } else if (!(type & TLV_OPTIONAL_TYPE_BIT)) {
      throw stampInvalid(WHERE, `${name} is not known to this version and is not marked optional (types 0x8000 and up)`);
    }
    // Certificates are checked here too, so that the error names the record (checkStamp only knows fields).
    if (type === TLV_TYPES.certificate || type === TLV_TYPES.chainCertificate) {
      try { parseCertificate(value); } catch (err) { throw stampInvalid(WHERE, `${name} is not a DER certificate (${(err as Error).message})`, err); }
    }
  }
  if (offset !== total) throw stampInvalid(WHERE, `${total - offset} bytes after the last record, inside the image length`);

  const need = (type: number): Buffer => {
    const v = single.get(type);
    if (!v) throw stampInvalid(WHERE, `no ${TLV_TYPE_NAMES.get(type)} record (type ${hex4(type)})`);
    return v;
  };
  const text = (type: number): string => {
    try { return utf8.decode(need(type)); } catch (err) { throw stampInvalid(WHERE, `the ${TLV_TYPE_NAMES.get(type)} record is not valid UTF-8`, err); }
  };
  const deviceKey = single.get(TLV_TYPES.devicePrivateKey);
  const onboardingKey = single.get(TLV_TYPES.onboardingPrivateKey);
  const stamp: Stamp = {
    version: STAMP_VERSION,
    serialNumber: text(TLV_TYPES.serialNumber),
    udid: text(TLV_TYPES.udid),
    company: text(TLV_TYPES.company),
    product: text(TLV_TYPES.product),
    batch: text(TLV_TYPES.batch),
    certificateDer: need(TLV_TYPES.certificate),
    chainDer,
    ...(deviceKey ? { devicePrivateKeyPkcs8: deviceKey } : {}),
    popSecret: need(TLV_TYPES.popSecret),
    onboardingPublicKeySpki: need(TLV_TYPES.onboardingPublicKey),
    ...(onboardingKey ? { onboardingPrivateKeyPkcs8: onboardingKey } : {}),
    qrPayload: text(TLV_TYPES.qrPayload),
  };
  checkStamp(stamp, WHERE);
  return stamp;
}

function sniff(data: Buffer): boolean {
  return data.length >= TLV_MAGIC.length && data.subarray(0, TLV_MAGIC.length).equals(TLV_MAGIC);
}

// ".tlv.bin": flashing tools (esptool write_flash, J-Link) expect .bin; "tlv" tells it from other images.
export const tlvFormat: StampFormat = { name: 'tlv', extension: '.tlv.bin', encode, decode, sniff };
