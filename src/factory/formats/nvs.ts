// The nvs stamp format: the CSV input of ESP-IDF's NVS partition generator
// (components/nvs_flash/nvs_partition_generator/nvs_partition_gen.py), so that an ESP32 factory turns
// each stamp into an NVS partition image with the tool it already uses:
//
//   python nvs_partition_gen.py generate SERIAL.nvs.csv SERIAL.nvs.bin 0x6000
//
// and the firmware reads its identity with nvs_get_str / nvs_get_blob / nvs_get_u8 from namespace
// "hallmark". The CSV is `key,type,encoding,value`: first a namespace row, then one `data` row per
// field; text as `string`, binary as `base64` (stored as an NVS blob), counts as `u8`. NVS keys are at
// most 15 characters. docs/stamp-formats.md lists the keys; NVS_KEYS below is the same list.
//
// decode() reads the file back with RFC 4180 quoting, refuses what the generator would mangle or
// refuse (a key over 15 characters, values with leading or trailing white space), ignores rows in
// other namespaces (a factory may append its own settings to the file), and refuses unknown keys in
// the "hallmark" namespace (a misspelt key would otherwise read as a missing optional field).

import { STAMP_LIMITS, STAMP_VERSION, checkStamp, stampInvalid, type Stamp, type StampFormat } from '../stamp.js';

export const NVS_NAMESPACE = 'hallmark';
/** A CSV stamp is a few base64 certificates and keys: 256 KiB is far above any real one. */
export const MAX_NVS_CSV_BYTES = 256 * 1024;
const MAX_ROWS = 256;
/** NVS limits: keys up to 15 characters, strings up to 4000 bytes with the terminating NUL. */
export const NVS_MAX_KEY = 15;
const NVS_MAX_STRING_BYTES = 3999;

const HEADER = ['key', 'type', 'encoding', 'value'];
const WHERE = 'nvs stamp';

type Encoding = 'u8' | 'string' | 'base64';

/** Every key of namespace "hallmark", its encoding, and whether a stamp always has it. */
export const NVS_KEYS: ReadonlyMap<string, { readonly encoding: Encoding; readonly required: boolean; readonly meaning: string }> = new Map([
  ['version', { encoding: 'u8', required: true, meaning: 'stamp version (1)' }],
  ['serial', { encoding: 'string', required: true, meaning: 'serial number' }],
  ['udid', { encoding: 'string', required: true, meaning: 'UDID (lower-case hex)' }],
  ['company', { encoding: 'string', required: true, meaning: 'company' }],
  ['product', { encoding: 'string', required: true, meaning: 'product' }],
  ['batch', { encoding: 'string', required: true, meaning: 'batch' }],
  ['cert', { encoding: 'base64', required: true, meaning: 'operational certificate (DER)' }],
  ['chain_count', { encoding: 'u8', required: true, meaning: 'number of chain certificates (0-8)' }],
  ...Array.from({ length: STAMP_LIMITS.chain }, (_, i) => [`chain_${i}`, { encoding: 'base64' as const, required: false, meaning: `chain certificate ${i} (DER; 0 is the issuer, the last is the root)` }] as const),
  ['dev_key', { encoding: 'base64', required: false, meaning: 'device private key (PKCS#8 DER), when the authority made it' }],
  ['pop_secret', { encoding: 'base64', required: true, meaning: 'PoP secret (raw bytes)' }],
  ['onb_pub', { encoding: 'base64', required: true, meaning: 'onboarding public key (X25519 SPKI DER)' }],
  ['onb_key', { encoding: 'base64', required: false, meaning: 'onboarding private key (X25519 PKCS#8 DER)' }],
  ['qr', { encoding: 'string', required: true, meaning: 'QR payload' }],
]);

// ---------------------------------------------------------------- encode

/** RFC 4180 quoting; the generator reads the file with Python's csv module, which undoes it. */
function field(value: string): string {
  return /[",\r\n]/.test(value) ? `"${value.replace(/"/g, '""')}"` : value;
}

function encode(stamp: Stamp): Buffer {
  checkStamp(stamp, WHERE);
  const rows: string[][] = [HEADER, [NVS_NAMESPACE, 'namespace', '', '']];
  const text = (key: string, value: string) => {
    // Refused rather than quoted: the generator strips white space around values, so the device
    // would get another string than the one the authority recorded.
    if (value !== value.trim()) throw stampInvalid(WHERE, `${NVS_KEYS.get(key)!.meaning} has leading or trailing white space, which NVS cannot carry exactly`);
    if (Buffer.byteLength(value, 'utf8') > NVS_MAX_STRING_BYTES) throw stampInvalid(WHERE, `${NVS_KEYS.get(key)!.meaning} is over the NVS string limit of ${NVS_MAX_STRING_BYTES} bytes`);
    rows.push([key, 'data', 'string', value]);
  };
  const blob = (key: string, value: Buffer) => rows.push([key, 'data', 'base64', value.toString('base64')]);
  rows.push(['version', 'data', 'u8', String(stamp.version)]);
  text('serial', stamp.serialNumber);
  text('udid', stamp.udid);
  text('company', stamp.company);
  text('product', stamp.product);
  text('batch', stamp.batch);
  blob('cert', stamp.certificateDer);
  rows.push(['chain_count', 'data', 'u8', String(stamp.chainDer.length)]);
  stamp.chainDer.forEach((der, i) => blob(`chain_${i}`, der));
  if (stamp.devicePrivateKeyPkcs8) blob('dev_key', stamp.devicePrivateKeyPkcs8);
  blob('pop_secret', stamp.popSecret);
  blob('onb_pub', stamp.onboardingPublicKeySpki);
  if (stamp.onboardingPrivateKeyPkcs8) blob('onb_key', stamp.onboardingPrivateKeyPkcs8);
  text('qr', stamp.qrPayload);
  return Buffer.from(rows.map((r) => r.map(field).join(',')).join('\n') + '\n', 'utf8');
}

// ---------------------------------------------------------------- CSV reading

interface Row { readonly line: number; readonly fields: string[] }

/**
 * RFC 4180 CSV: fields separated by commas, optionally in double quotes (a quote inside doubled),
 * records ending in LF or CRLF. Refuses a quote inside an unquoted field, text after a closing quote
 * and an unterminated quote. `line` is the 1-based line a record starts on, for error messages.
 */
export function parseCsv(text: string, where: string, maxRows: number): Row[] {
  const rows: Row[] = [];
  let fields: string[] = [];
  let value = '';
  let line = 1;
  let rowLine = 1;
  let i = 0;
  let quoted = false; // the current field was quoted (and has been closed)
  const endField = () => { fields.push(value); value = ''; quoted = false; };
  const endRow = () => {
    endField();
    if (rows.length >= maxRows) throw stampInvalid(where, `more than ${maxRows} rows`);
    rows.push({ line: rowLine, fields });
    fields = [];
  };
  while (i < text.length) {
    const ch = text[i]!;
    if (ch === '"' && value === '' && !quoted) {
      // A quoted field: read to the closing quote.
      const start = line;
      i++;
      for (;;) {
        if (i >= text.length) throw stampInvalid(where, `line ${start}: a quoted field is not closed (truncated?)`);
        const c = text[i]!;
        if (c === '"') {
          if (text[i + 1] === '"') { value += '"'; i += 2; continue; }
          i++;
          break;
        }
        if (c === '\n') line++;
        value += c;
        i++;
      }
      quoted = true;
      const next = text[i];
      if (next !== undefined && next !== ',' && next !== '\n' && next !== '\r') throw stampInvalid(where, `line ${line}: text after a closing quote`);
      continue;
    }
    if (ch === ',') { endField(); i++; continue; }
    if (ch === '\r' && text[i + 1] === '\n') { i++; continue; }
    if (ch === '\n') { endRow(); line++; rowLine = line; i++; continue; }
    if (ch === '"') throw stampInvalid(where, `line ${line}: a quote inside an unquoted field`);
    if (ch === '\r') throw stampInvalid(where, `line ${line}: a carriage return without a line feed`);
    if (quoted) throw stampInvalid(where, `line ${line}: text after a closing quote`);
    value += ch;
    i++;
  }
  // A last line without a line end.
  if (value !== '' || quoted || fields.length > 0) endRow();
  return rows;
}

// ---------------------------------------------------------------- decode

const utf8 = new TextDecoder('utf-8', { fatal: true });
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function decode(data: Buffer): Stamp {
  if (data.length > MAX_NVS_CSV_BYTES) throw stampInvalid(WHERE, `file is ${data.length} bytes, over the ${MAX_NVS_CSV_BYTES}-byte limit`);
  let text: string;
  try { text = utf8.decode(data); } catch (err) { throw stampInvalid(WHERE, 'file is not valid UTF-8', err); }
  text = text.replace(/^\ufeff/, ''); // a byte order mark, as spreadsheet programs write
  const rows = parseCsv(text, WHERE, MAX_ROWS);
  if (rows.length === 0) throw stampInvalid(WHERE, 'file is empty');
  if (rows[0]!.fields.join(',') !== HEADER.join(',')) throw stampInvalid(WHERE, `line 1 is not the header "${HEADER.join(',')}"`);

  const values = new Map<string, { line: number; value: string }>();
  let namespace: string | undefined;
  for (const { line, fields } of rows.slice(1)) {
    if (fields.length !== 4) throw stampInvalid(WHERE, `line ${line} has ${fields.length} fields, expected 4 (key,type,encoding,value)`);
    const [key, type, encoding, value] = fields as [string, string, string, string];
    if (key.length === 0 || key.length > NVS_MAX_KEY) throw stampInvalid(WHERE, `line ${line}: key ${JSON.stringify(key.slice(0, 32))} is not 1-${NVS_MAX_KEY} characters (the NVS limit)`);
    if (type === 'namespace') {
      if (encoding !== '' || value !== '') throw stampInvalid(WHERE, `line ${line}: a namespace row has an empty encoding and value`);
      namespace = key;
      continue;
    }
    if (namespace === undefined) throw stampInvalid(WHERE, `line ${line}: the first row after the header must be a namespace row ("${NVS_NAMESPACE},namespace,,")`);
    if (namespace !== NVS_NAMESPACE) continue; // another namespace: the factory's own settings
    const spec = NVS_KEYS.get(key);
    if (!spec) throw stampInvalid(WHERE, `line ${line}: unknown key ${JSON.stringify(key)} in namespace "${NVS_NAMESPACE}"`);
    if (type !== 'data') throw stampInvalid(WHERE, `line ${line}: key "${key}" has type ${JSON.stringify(type.slice(0, 32))}, expected data`);
    if (encoding !== spec.encoding) throw stampInvalid(WHERE, `line ${line}: key "${key}" has encoding ${JSON.stringify(encoding.slice(0, 32))}, expected ${spec.encoding}`);
    if (values.has(key)) throw stampInvalid(WHERE, `line ${line}: key "${key}" appears a second time (first on line ${values.get(key)!.line})`);
    if (value !== value.trim()) throw stampInvalid(WHERE, `line ${line}: the value of "${key}" has leading or trailing white space`);
    values.set(key, { line, value });
  }
  if (namespace === undefined) throw stampInvalid(WHERE, `no namespace row ("${NVS_NAMESPACE},namespace,,")`);
  for (const [key, spec] of NVS_KEYS) {
    if (spec.required && !values.has(key)) throw stampInvalid(WHERE, `key "${key}" (${spec.meaning}) is missing`);
  }

  const u8 = (key: string): number => {
    const { line, value } = values.get(key)!;
    if (!/^\d{1,3}$/.test(value) || Number(value) > 255) throw stampInvalid(WHERE, `line ${line}: the value of "${key}" is not a u8`);
    return Number(value);
  };
  const str = (key: string): string => values.get(key)!.value;
  const blob = (key: string): Buffer => {
    const { line, value } = values.get(key)!;
    if (value.length === 0) throw stampInvalid(WHERE, `line ${line}: the value of "${key}" is empty`);
    if (!BASE64.test(value)) throw stampInvalid(WHERE, `line ${line}: the value of "${key}" is not base64`);
    return Buffer.from(value, 'base64');
  };
  const optionalBlob = (key: string): Buffer | undefined => (values.has(key) ? blob(key) : undefined);

  const version = u8('version');
  if (version !== STAMP_VERSION) throw stampInvalid(WHERE, `stamp version ${version} is not supported (expected ${STAMP_VERSION})`);
  const chainCount = u8('chain_count');
  if (chainCount > STAMP_LIMITS.chain) throw stampInvalid(WHERE, `chain_count ${chainCount} is over the limit of ${STAMP_LIMITS.chain}`);
  for (let i = 0; i < STAMP_LIMITS.chain; i++) {
    const present = values.has(`chain_${i}`);
    if (i < chainCount && !present) throw stampInvalid(WHERE, `key "chain_${i}" is missing (chain_count is ${chainCount})`);
    if (i >= chainCount && present) throw stampInvalid(WHERE, `line ${values.get(`chain_${i}`)!.line}: key "chain_${i}" is beyond chain_count ${chainCount}`);
  }
  const deviceKey = optionalBlob('dev_key');
  const onboardingKey = optionalBlob('onb_key');
  const stamp: Stamp = {
    version: STAMP_VERSION,
    serialNumber: str('serial'),
    udid: str('udid'),
    company: str('company'),
    product: str('product'),
    batch: str('batch'),
    certificateDer: blob('cert'),
    chainDer: Array.from({ length: chainCount }, (_, i) => blob(`chain_${i}`)),
    ...(deviceKey ? { devicePrivateKeyPkcs8: deviceKey } : {}),
    popSecret: blob('pop_secret'),
    onboardingPublicKeySpki: blob('onb_pub'),
    ...(onboardingKey ? { onboardingPrivateKeyPkcs8: onboardingKey } : {}),
    qrPayload: str('qr'),
  };
  checkStamp(stamp, WHERE);
  return stamp;
}

function sniff(data: Buffer): boolean {
  const head = data.subarray(0, 64).toString('utf8').replace(/^\ufeff/, '');
  return /^key,type,encoding,value\r?\n/.test(head);
}

// ".nvs.csv": the generator's input is a .csv file; "nvs" tells it from the batch summary CSV.
export const nvsFormat: StampFormat = { name: 'nvs', extension: '.nvs.csv', encode, decode, sniff };
