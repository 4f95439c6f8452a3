// Distinguished names: "CN=Device 1,O=Acme,C=DE" <-> DER Name.

import { HallmarkError } from '../errors.js';
import { TAG, children, content, decodeOid, expectTlv, oid, printableString, readWhole, seq, set, utf8String, ia5String, type Tlv } from './der.js';

const ATTRIBUTES: ReadonlyArray<readonly [short: string, oid: string, encoding: 'utf8' | 'printable' | 'ia5']> = [
  ['CN', '2.5.4.3', 'utf8'],
  ['SERIALNUMBER', '2.5.4.5', 'printable'],
  ['C', '2.5.4.6', 'printable'],
  ['L', '2.5.4.7', 'utf8'],
  ['ST', '2.5.4.8', 'utf8'],
  ['STREET', '2.5.4.9', 'utf8'],
  ['O', '2.5.4.10', 'utf8'],
  ['OU', '2.5.4.11', 'utf8'],
  ['TITLE', '2.5.4.12', 'utf8'],
  ['DNQUALIFIER', '2.5.4.46', 'printable'],
  ['UID', '0.9.2342.19200300.100.1.1', 'utf8'],
  ['DC', '0.9.2342.19200300.100.1.25', 'ia5'],
  ['EMAIL', '1.2.840.113549.1.9.1', 'ia5'],
];
const BY_SHORT = new Map(ATTRIBUTES.map((a) => [a[0], a]));
const SHORT_BY_OID = new Map(ATTRIBUTES.map((a) => [a[1], a[0] === 'SERIALNUMBER' ? 'serialNumber' : a[0] === 'EMAIL' ? 'emailAddress' : a[0]]));
BY_SHORT.set('SERIALNUMBER', ATTRIBUTES[1]!);
BY_SHORT.set('EMAILADDRESS', ATTRIBUTES[12]!);

export interface NameAttribute { readonly type: string; readonly value: string }

const MAX_NAME_TEXT = 4096;

/** Splits an RFC 4514-style string ("CN=a\,b,O=Acme") into attributes, in the order written. */
export function parseNameString(text: string): NameAttribute[] {
  if (text.length > MAX_NAME_TEXT) throw new HallmarkError('INPUT_TOO_LARGE', 'distinguished name is too long');
  const out: NameAttribute[] = [];
  let i = 0;
  // OpenSSL's "/CN=a/O=b" form is recognised by its leading slash; otherwise a '/' is part of a value.
  const trimmed = text.replace(/^\s+/, '').replace(/(?<!\\)\s+$/, ''); // an escaped final space stays
  const separator = trimmed.startsWith('/') ? '/' : ',';
  const s = separator === '/' ? trimmed.slice(1) : trimmed;
  while (i < s.length) {
    let type = '';
    while (i < s.length && s[i] !== '=') type += s[i++];
    if (s[i] !== '=') throw new HallmarkError('BAD_REQUEST', `bad distinguished name ${JSON.stringify(text)}: missing '='`);
    i++;
    // Unescaped leading/trailing spaces are dropped; escaped ones ("\\ ") belong to the value.
    const chars: Array<{ c: string; escaped: boolean }> = [];
    while (i < s.length && s[i] !== separator) {
      if (s[i] === '\\' && i + 1 < s.length) { chars.push({ c: s[i + 1]!, escaped: true }); i += 2; } else chars.push({ c: s[i++]!, escaped: false });
    }
    i++;
    const t = type.trim().toUpperCase();
    if (!BY_SHORT.has(t)) throw new HallmarkError('BAD_REQUEST', `bad distinguished name: unknown attribute ${JSON.stringify(type.trim())}`);
    let a = 0;
    let b = chars.length;
    while (a < b && !chars[a]!.escaped && /\s/.test(chars[a]!.c)) a++;
    while (b > a && !chars[b - 1]!.escaped && /\s/.test(chars[b - 1]!.c)) b--;
    const v = chars.slice(a, b).map((x) => x.c).join('');
    if (!v) throw new HallmarkError('BAD_REQUEST', `bad distinguished name: empty ${t}`);
    out.push({ type: t, value: v });
  }
  if (out.length === 0) throw new HallmarkError('BAD_REQUEST', 'empty distinguished name');
  return out;
}

/** Encodes attributes as a DER Name, one attribute per RDN. */
export function encodeName(attributes: readonly NameAttribute[]): Buffer {
  return seq(...attributes.map(({ type, value }) => {
    const def = BY_SHORT.get(type.toUpperCase());
    if (!def) throw new HallmarkError('BAD_REQUEST', `unknown name attribute ${type}`);
    let encoded: Buffer;
    if (def[2] === 'printable') {
      if (!/^[A-Za-z0-9 '()+,\-./:=?]*$/.test(value)) throw new HallmarkError('BAD_REQUEST', `${type} must be a printable string`);
      if (def[0] === 'C' && !/^[A-Z]{2}$/.test(value)) throw new HallmarkError('BAD_REQUEST', 'C must be a two-letter country code');
      encoded = printableString(value);
    } else if (def[2] === 'ia5') {
      if (!/^[\x00-\x7f]*$/.test(value)) throw new HallmarkError('BAD_REQUEST', `${type} must be ASCII`);
      encoded = ia5String(value);
    } else {
      if (value.length > 256) throw new HallmarkError('BAD_REQUEST', `${type} is longer than 256 characters`);
      encoded = utf8String(value);
    }
    return set(seq(oid(def[1]), encoded));
  }));
}

export const encodeNameString = (text: string): Buffer => encodeName(parseNameString(text));

function escapeValue(v: string): string {
  return v.replace(/([,+"\\<>;=])/g, '\\$1').replace(/^([ #])/, '\\$1').replace(/ $/, '\\ ');
}

/** Decodes a DER Name to attributes. */
export function decodeName(der: Buffer): NameAttribute[] {
  const root = readWhole(der, TAG.SEQUENCE, 'Name');
  const out: NameAttribute[] = [];
  for (const rdn of children(der, root)) {
    if (rdn.tag !== TAG.SET) throw new HallmarkError('BAD_DER', 'Name: RDN is not a SET');
    for (const atv of children(der, rdn)) {
      const [typeT, valueT] = children(der, atv) as [Tlv, Tlv];
      if (!typeT || !valueT || typeT.tag !== TAG.OID) throw new HallmarkError('BAD_DER', 'Name: bad AttributeTypeAndValue');
      const typeOid = decodeOid(content(der, typeT));
      const raw = content(der, valueT);
      const value = valueT.tag === 0x1e ? Buffer.from(raw).swap16().toString('utf16le') : raw.toString(valueT.tag === TAG.UTF8_STRING ? 'utf8' : 'latin1');
      out.push({ type: SHORT_BY_OID.get(typeOid) ?? typeOid, value });
    }
  }
  return out;
}

/** A DER Name as text, most significant first as written in the certificate ("CN=x, O=y" order kept). */
export function nameToString(der: Buffer): string {
  return decodeName(der).map((a) => `${a.type}=${escapeValue(a.value)}`).join(', ');
}

export function commonNameOf(der: Buffer): string | undefined {
  return decodeName(der).find((a) => a.type === 'CN')?.value;
}

/** Checks that a buffer is one DER Name and returns it. */
export function expectName(buf: Buffer, at: number, limit: number): Tlv {
  return expectTlv(buf, at, TAG.SEQUENCE, limit, 'Name');
}

