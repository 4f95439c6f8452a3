// The json stamp format: one UTF-8 JSON document per device, for factory tools that speak JSON.
//
// Certificates and keys are PEM strings (what most device SDKs and `openssl` take as they are); the
// private keys are unencrypted PKCS#8 PEM. These files are the clear-text form of a stamp: in transit
// they travel inside the encrypted, signed archive (src/factory/archive.ts), and `stamp open` writes
// them 0600. Keys appear in a fixed order so that two runs over the same stamp give the same bytes.
// docs/stamp-formats.md documents every field.

import { HallmarkError } from '../../errors.js';
import { decodePemBlocks, encodePem } from '../../pki/pem.js';
import { STAMP_LIMITS, STAMP_VERSION, checkStamp, stampInvalid, type Stamp, type StampFormat } from '../stamp.js';

/** The value of the "format" member: lets `stamp inspect` tell a stamp from any other JSON file. */
export const JSON_STAMP_FORMAT = 'hallmark-stamp';

/** A json stamp is a few certificates and keys as PEM: 256 KiB is far above any real one (8 certificates of 16 KiB). */
export const MAX_JSON_STAMP_BYTES = 256 * 1024;

const WHERE = 'json stamp';

// The members, in the order they are written. Optional members are left out when absent (never null).
const MEMBERS = [
  'format', 'version', 'serialNumber', 'udid', 'company', 'product', 'batch',
  'certificate', 'chain', 'devicePrivateKey', 'popSecret', 'onboardingPublicKey', 'onboardingPrivateKey', 'qrPayload',
] as const;
const OPTIONAL = new Set<string>(['devicePrivateKey', 'onboardingPrivateKey']);

const utf8 = new TextDecoder('utf-8', { fatal: true });

function encode(stamp: Stamp): Buffer {
  checkStamp(stamp, WHERE);
  const doc: Record<string, unknown> = {
    format: JSON_STAMP_FORMAT,
    version: stamp.version,
    serialNumber: stamp.serialNumber,
    udid: stamp.udid,
    company: stamp.company,
    product: stamp.product,
    batch: stamp.batch,
    certificate: encodePem('CERTIFICATE', stamp.certificateDer),
    chain: stamp.chainDer.map((der) => encodePem('CERTIFICATE', der)),
  };
  if (stamp.devicePrivateKeyPkcs8) doc.devicePrivateKey = encodePem('PRIVATE KEY', stamp.devicePrivateKeyPkcs8);
  doc.popSecret = stamp.popSecret.toString('hex');
  doc.onboardingPublicKey = encodePem('PUBLIC KEY', stamp.onboardingPublicKeySpki);
  if (stamp.onboardingPrivateKeyPkcs8) doc.onboardingPrivateKey = encodePem('PRIVATE KEY', stamp.onboardingPrivateKeyPkcs8);
  doc.qrPayload = stamp.qrPayload;
  return Buffer.from(JSON.stringify(doc, null, 2) + '\n', 'utf8');
}

function str(doc: Record<string, unknown>, member: string): string {
  const v = doc[member];
  if (typeof v !== 'string') throw stampInvalid(WHERE, `member "${member}" is ${v === undefined ? 'missing' : 'not a string'}`);
  return v;
}

/** One PEM block with `label`, as DER; names the member in every error. */
function pem(member: string, text: string, label: string, maxBytes: number): Buffer {
  let blocks;
  try {
    blocks = decodePemBlocks(text, maxBytes);
  } catch (err) {
    throw stampInvalid(WHERE, `member "${member}" is not PEM (${(err as HallmarkError).message})`, err);
  }
  if (blocks.length !== 1) throw stampInvalid(WHERE, `member "${member}" holds ${blocks.length} PEM blocks, expected one`);
  if (blocks[0]!.label !== label) throw stampInvalid(WHERE, `member "${member}" is PEM ${blocks[0]!.label}, expected ${label}`);
  return blocks[0]!.der;
}

function decode(data: Buffer): Stamp {
  if (data.length > MAX_JSON_STAMP_BYTES) throw stampInvalid(WHERE, `file is ${data.length} bytes, over the ${MAX_JSON_STAMP_BYTES}-byte limit`);
  let text: string;
  try { text = utf8.decode(data); } catch (err) { throw stampInvalid(WHERE, 'file is not valid UTF-8', err); }
  let doc: unknown;
  try { doc = JSON.parse(text); } catch (err) { throw stampInvalid(WHERE, `file is not JSON (${(err as Error).message})`, err); }
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) throw stampInvalid(WHERE, 'file is not a JSON object');
  const d = doc as Record<string, unknown>;
  if (d.format !== JSON_STAMP_FORMAT) throw stampInvalid(WHERE, `member "format" is not "${JSON_STAMP_FORMAT}"`);
  if (d.version !== STAMP_VERSION) throw stampInvalid(WHERE, `stamp version ${JSON.stringify(d.version)} is not supported (expected ${STAMP_VERSION})`);
  // Unknown members are refused rather than ignored: a misspelt "devicePrivatekey" would otherwise
  // read as "no device key" and the device would be flashed without one.
  for (const key of Object.keys(d)) {
    if (!(MEMBERS as readonly string[]).includes(key)) throw stampInvalid(WHERE, `unknown member ${JSON.stringify(key.slice(0, 64))}`);
  }
  for (const key of MEMBERS) {
    if (!OPTIONAL.has(key) && !(key in d)) throw stampInvalid(WHERE, `member "${key}" is missing`);
  }
  if (!Array.isArray(d.chain)) throw stampInvalid(WHERE, 'member "chain" is not an array');
  if (d.chain.length > STAMP_LIMITS.chain) throw stampInvalid(WHERE, `member "chain" has ${d.chain.length} certificates, over the limit of ${STAMP_LIMITS.chain}`);
  const chainDer = d.chain.map((c, i) => {
    if (typeof c !== 'string') throw stampInvalid(WHERE, `member "chain" entry ${i + 1} is not a string`);
    return pem(`chain[${i}]`, c, 'CERTIFICATE', 64 * 1024);
  });
  const popHex = str(d, 'popSecret');
  if (!/^(?:[0-9a-f]{2})+$/.test(popHex)) throw stampInvalid(WHERE, 'member "popSecret" is not lower-case hex');
  const stamp: Stamp = {
    version: STAMP_VERSION,
    serialNumber: str(d, 'serialNumber'),
    udid: str(d, 'udid'),
    company: str(d, 'company'),
    product: str(d, 'product'),
    batch: str(d, 'batch'),
    certificateDer: pem('certificate', str(d, 'certificate'), 'CERTIFICATE', 64 * 1024),
    chainDer,
    ...(d.devicePrivateKey === undefined ? {} : { devicePrivateKeyPkcs8: pem('devicePrivateKey', str(d, 'devicePrivateKey'), 'PRIVATE KEY', STAMP_LIMITS.key) }),
    popSecret: Buffer.from(popHex, 'hex'),
    onboardingPublicKeySpki: pem('onboardingPublicKey', str(d, 'onboardingPublicKey'), 'PUBLIC KEY', STAMP_LIMITS.key),
    ...(d.onboardingPrivateKey === undefined ? {} : { onboardingPrivateKeyPkcs8: pem('onboardingPrivateKey', str(d, 'onboardingPrivateKey'), 'PRIVATE KEY', STAMP_LIMITS.key) }),
    qrPayload: str(d, 'qrPayload'),
  };
  checkStamp(stamp, WHERE);
  return stamp;
}

function sniff(data: Buffer): boolean {
  // A JSON object whose first bytes (after white space or a BOM) are "{"; the "format" member is
  // checked by decode(). Looking for the format string in the first KiB keeps this cheap.
  const head = data.subarray(0, 1024).toString('utf8').replace(/^\ufeff/, '').trimStart();
  return head.startsWith('{') && head.includes(`"${JSON_STAMP_FORMAT}"`);
}

export const jsonFormat: StampFormat = { name: 'json', extension: '.json', encode, decode, sniff };

// ---------------------------------------------------------------- batch summary CSV

/** The header line of the batch summary CSV (one line per stamped device; no secrets). */
export function batchSummaryCsvHeader(): string {
  return 'serial_number,udid,certificate_sha256\r\n';
}

/**
 * One line of the batch summary CSV (RFC 4180: CRLF line ends, fields with a comma, quote, CR, LF or
 * leading / trailing space in double quotes, quotes doubled). Values are written exactly as they are:
 * the summary is for machines to join against the registry, so nothing is prefixed to defuse
 * spreadsheet formulas (serial numbers come from the OEM's own registry, not from outside).
 */
export function batchSummaryCsvLine(stamp: Pick<Stamp, 'serialNumber' | 'udid'>, fingerprintSha256: string): string {
  if (!/^[0-9a-f]{64}$/.test(fingerprintSha256)) throw new HallmarkError('BAD_REQUEST', 'the certificate fingerprint must be 64 lower-case hex digits (SHA-256)');
  return [stamp.serialNumber, stamp.udid, fingerprintSha256].map(csvField).join(',') + '\r\n';
}

/** RFC 4180 quoting of one field. */
export function csvField(value: string): string {
  return /[",\r\n]|^\s|\s$/.test(value) ? `"${value.replace(/"/g, '""')}"` : value;
}
