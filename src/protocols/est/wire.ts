// EST (RFC 7030) wire formats: parse and render only. No policy, no I/O beyond reading TLS socket
// state for channel binding. Used by the EST HTTP routes (server) and the device client.
//
// DER is written and read with the small helpers in ../../pki/der.ts rather than an ASN.1 object
// model: certs-only responses are built once per enrolment, and the structures here are a handful
// of TLVs around certificates that are already encoded.

import { randomBytes } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import { HallmarkError } from '../../errors.js';
import { OID_CHALLENGE_PASSWORD, type ParsedCsr } from '../../pki/csr.js';
import { TAG, children, content, decodeOid, oid, readTlv, readWhole, seq, set, tlv, whole, type Tlv } from '../../pki/der.js';

const OID_SIGNED_DATA = '1.2.840.113549.1.7.2';
const OID_DATA = '1.2.840.113549.1.7.1';

/** Default limit for certs-only CMS and multipart bodies. */
const DEFAULT_MAX_BYTES = 1024 * 1024;
/** Limit for a CsrAttrs body (a few OIDs in practice). */
const CSR_ATTRS_MAX_BYTES = 64 * 1024;

const badDer = (what: string): HallmarkError => new HallmarkError('BAD_DER', what);
const badRequest = (what: string): HallmarkError => new HallmarkError('BAD_REQUEST', what);
const tooLarge = (what: string, size: number, max: number): HallmarkError =>
  new HallmarkError('INPUT_TOO_LARGE', `${what} is ${size} bytes, over the ${max}-byte limit`);

// ---------------------------------------------------------------- certs-only CMS (§4.1.3, §4.2.3)

// The fixed parts of a degenerate SignedData, encoded once.
const CONTENT_TYPE_SIGNED_DATA = oid(OID_SIGNED_DATA);
const SIGNED_DATA_HEAD = Buffer.concat([
  Buffer.from([TAG.INTEGER, 0x01, 0x01]), // version 1
  set(), // digestAlgorithms: none
  seq(oid(OID_DATA)), // encapContentInfo: id-data, no eContent
]);
const EMPTY_SET = set(); // signerInfos: none

/**
 * RFC 7030 §4.1.3 / §4.2.3: a CMS ContentInfo(SignedData) "certs-only" (degenerate, no signers)
 * holding the given DER certificates in order.
 *
 * Written with the der.ts TLV writer, not an ASN.1 builder: this runs once per enrolment response
 * and is three nested headers around certificates that are already DER (an object model would
 * re-parse and re-encode each certificate). The certificates are kept in the given order (chain
 * order), not DER-sorted as SET OF would demand: clients read the chain in order, and OpenSSL
 * likewise declares this field SEQUENCE OF internally so as not to reorder it.
 */
export function encodeCertsOnly(certificates: readonly Buffer[]): Buffer {
  for (const [i, cert] of certificates.entries()) {
    // One header read each (O(1)): refuses to wrap something that is not a single DER element.
    const t = readTlv(cert, 0);
    if (t.tag !== TAG.SEQUENCE || t.end !== cert.length) throw badDer(`certs-only: certificate ${i} is not one DER SEQUENCE`);
  }
  const signedData = certificates.length > 0
    ? seq(SIGNED_DATA_HEAD, tlv(0xa0, ...certificates), EMPTY_SET) // certificates [0] IMPLICIT SET OF
    : seq(SIGNED_DATA_HEAD, EMPTY_SET); // certificates is OPTIONAL: left out when empty
  return seq(CONTENT_TYPE_SIGNED_DATA, tlv(0xa0, signedData));
}

/**
 * Parses a certs-only CMS (DER) and returns its certificates (DER, views into `der`), in order.
 * Signers and CRLs, if any, are ignored (not verified); CertificateChoices other than a plain
 * Certificate (attribute certificates, other formats) are skipped. BER (indefinite lengths) is refused.
 */
export function decodeCertsOnly(der: Buffer, maxBytes = DEFAULT_MAX_BYTES): Buffer[] {
  if (der.length > maxBytes) throw tooLarge('certs-only CMS', der.length, maxBytes);
  try {
    const ci = readWhole(der, TAG.SEQUENCE, 'ContentInfo');
    const ciParts = children(der, ci);
    const [typeT, explicitT] = ciParts;
    if (ciParts.length !== 2 || typeT!.tag !== TAG.OID || explicitT!.tag !== 0xa0) throw badDer('certs-only: ContentInfo must be { contentType, [0] content }');
    const contentType = decodeOid(content(der, typeT!));
    if (contentType !== OID_SIGNED_DATA) throw badDer(`certs-only: content type ${contentType} is not SignedData (${OID_SIGNED_DATA})`);
    const inner = children(der, explicitT!);
    if (inner.length !== 1 || inner[0]!.tag !== TAG.SEQUENCE) throw badDer('certs-only: [0] must hold one SignedData SEQUENCE');
    const fields = children(der, inner[0]!);
    // version, digestAlgorithms, encapContentInfo, [0] certificates?, [1] crls?, signerInfos
    if (fields.length < 4 || fields.length > 6) throw badDer(`certs-only: SignedData has ${fields.length} fields`);
    const [versionT, digestsT, encapT] = fields as [Tlv, Tlv, Tlv];
    if (versionT.tag !== TAG.INTEGER || digestsT.tag !== TAG.SET || encapT.tag !== TAG.SEQUENCE) throw badDer('certs-only: bad SignedData version, digestAlgorithms or encapContentInfo');
    const encap = children(der, encapT);
    if (encap.length < 1 || encap[0]!.tag !== TAG.OID) throw badDer('certs-only: encapContentInfo has no content type');
    if (fields[fields.length - 1]!.tag !== TAG.SET) throw badDer('certs-only: SignedData does not end with signerInfos');
    let certsT: Tlv | undefined;
    const optional = fields.slice(3, -1);
    if (optional.length === 2 && (optional[0]!.tag !== 0xa0 || optional[1]!.tag !== 0xa1)) throw badDer('certs-only: bad certificates/crls fields');
    if (optional.length === 1 && optional[0]!.tag !== 0xa0 && optional[0]!.tag !== 0xa1) throw badDer('certs-only: unexpected SignedData field');
    if (optional[0]?.tag === 0xa0) certsT = optional[0];
    const out: Buffer[] = [];
    if (!certsT) return out;
    for (const c of children(der, certsT)) {
      if (c.tag !== TAG.SEQUENCE) continue; // attribute certificate or other format: not a Certificate
      // Shape check only (tbsCertificate, signatureAlgorithm, signature): one TLV walk, no X.509 parse.
      const parts = children(der, c);
      if (parts.length !== 3 || parts[0]!.tag !== TAG.SEQUENCE || parts[1]!.tag !== TAG.SEQUENCE || parts[2]!.tag !== TAG.BIT_STRING) {
        throw badDer(`certs-only: certificate ${out.length} is not a Certificate`);
      }
      out.push(whole(der, c));
    }
    return out;
  } catch (err) {
    if (err instanceof HallmarkError && err.code === 'BAD_DER' && !err.message.startsWith('certs-only')) {
      throw badDer(`certs-only: ${err.message}`);
    }
    throw err;
  }
}

// ---------------------------------------------------------------- base64 bodies (§4)

const B64_ALPHABET = /^[A-Za-z0-9+/]*={0,2}$/;
const WHITESPACE = /[\r\n\t ]+/g;
/** PEM armour a client may wrap an EST body in (a CSR, or a certs-only response). */
const ACCEPTED_ARMOUR = new Set(['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST', 'PKCS7', 'CMS']);
const ARMOUR = /^-----BEGIN ([A-Z0-9 ]{1,64})-----\r?\n([^-]*)-----END ([A-Z0-9 ]{1,64})-----$/;

/**
 * An EST base64 body (RFC 7030 §4: Content-Transfer-Encoding base64), possibly line-wrapped (CRLF or
 * LF), with surrounding whitespace, or in PEM armour (CERTIFICATE REQUEST, NEW CERTIFICATE REQUEST,
 * PKCS7, CMS). Returns DER. Strict: alphabet, padding and canonical final bits are checked.
 */
export function decodeBase64Body(body: Buffer | string, maxBytes: number): Buffer {
  // Refuse before any string work: base64 is 4/3 of the data, line breaks and armour add a little;
  // twice that is generous for any honest formatting.
  const encodedLimit = Math.ceil(maxBytes / 3) * 4 * 2 + 4096;
  if (body.length > encodedLimit) throw tooLarge('base64 body', body.length, encodedLimit);
  // latin1 maps bytes 1:1 (no UTF-8 decoding); any non-ASCII byte then fails the alphabet check.
  let text = (typeof body === 'string' ? body : body.toString('latin1')).trim();
  if (text.startsWith('-----BEGIN ')) {
    const m = ARMOUR.exec(text);
    if (!m) throw badRequest('body is not base64: malformed or multiple PEM blocks');
    if (m[1] !== m[3]) throw badRequest(`body is not base64: PEM block BEGIN ${m[1]} ends with END ${m[3]}`);
    if (!ACCEPTED_ARMOUR.has(m[1]!)) throw badRequest(`body is not base64: PEM armour "${m[1]}" is not accepted here`);
    text = m[2]!;
  }
  const b64 = text.replace(WHITESPACE, '');
  if (b64.length === 0) throw badRequest('body is not base64: empty');
  if (!B64_ALPHABET.test(b64)) throw badRequest('body is not base64: characters outside the base64 alphabet');
  if (b64.length % 4 !== 0) throw badRequest('body is not base64: length is not a multiple of 4 (truncated?)');
  const size = (b64.length / 4) * 3 - (b64.endsWith('==') ? 2 : b64.endsWith('=') ? 1 : 0);
  if (size > maxBytes) throw tooLarge('decoded body', size, maxBytes);
  const der = Buffer.from(b64, 'base64');
  // Buffer.from ignores the unused low bits of the last character; a strict decoder refuses them set.
  if (b64.endsWith('=')) {
    const last = b64.charCodeAt(b64.length - (b64.endsWith('==') ? 3 : 2));
    const value = B64_VALUE[last]!;
    if (value & (b64.endsWith('==') ? 0x0f : 0x03)) throw badRequest('body is not base64: non-canonical padding bits');
  }
  return der;
}

const B64_VALUE: number[] = (() => {
  const v: number[] = [];
  const chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';
  for (let i = 0; i < chars.length; i++) v[chars.charCodeAt(i)] = i;
  return v;
})();

/** base64 with 64-character lines, each ended by CRLF, as EST servers answer. */
export function encodeBase64Body(der: Buffer): string {
  const b64 = der.toString('base64');
  const lines: string[] = [];
  for (let i = 0; i < b64.length; i += 64) lines.push(b64.slice(i, i + 64));
  return lines.length ? lines.join('\r\n') + '\r\n' : '';
}

// ---------------------------------------------------------------- CsrAttrs (§4.5.2)

/** RFC 7030 §4.5.2 CsrAttrs: SEQUENCE SIZE (0..MAX) OF AttrOrOID (an OBJECT IDENTIFIER, or an Attribute { type OID, values SET OF ANY }). */
export type CsrAttr = { readonly oid: string } | { readonly attribute: string; readonly values: readonly Buffer[] };

const DOTTED_OID = /^([0-2])\.(0|[1-9]\d*)(\.(0|[1-9]\d*))*$/;

function encodeOidChecked(dotted: string): Buffer {
  const m = DOTTED_OID.exec(dotted);
  if (!m || (m[1] !== '2' && Number(m[2]) >= 40)) throw badRequest(`csrattrs: bad OID ${JSON.stringify(dotted)}`);
  return oid(dotted);
}

/** DER SET OF order (X.690 §11.6): by encoding, as octet strings, the shorter padded with zeros. */
function derSetOrder(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  const c = Buffer.compare(a.subarray(0, n), b.subarray(0, n));
  if (c !== 0) return c;
  const rest = a.length > b.length ? a.subarray(n) : b.subarray(n);
  if (rest.every((x) => x === 0)) return 0;
  return a.length > b.length ? 1 : -1;
}

/** Encodes CsrAttrs. Attribute values must each be one DER element; they are DER-sorted inside their SET. */
export function encodeCsrAttrs(items: readonly CsrAttr[]): Buffer {
  const encoded = items.map((item) => {
    if ('oid' in item) return encodeOidChecked(item.oid);
    if (item.values.length === 0) throw badRequest(`csrattrs: attribute ${item.attribute} has no values`);
    for (const v of item.values) {
      const t = readTlv(v, 0);
      if (t.end !== v.length) throw badDer(`csrattrs: a value of attribute ${item.attribute} is not one DER element`);
    }
    return seq(encodeOidChecked(item.attribute), set(...[...item.values].sort(derSetOrder)));
  });
  return seq(...encoded);
}

/** Decodes CsrAttrs (DER). Attribute values are returned as DER (views into `der`). */
export function decodeCsrAttrs(der: Buffer, maxBytes = CSR_ATTRS_MAX_BYTES): CsrAttr[] {
  if (der.length > maxBytes) throw tooLarge('CsrAttrs', der.length, maxBytes);
  try {
    const root = readWhole(der, TAG.SEQUENCE, 'CsrAttrs');
    return children(der, root).map((item, i): CsrAttr => {
      if (item.tag === TAG.OID) return { oid: decodeOid(content(der, item)) };
      if (item.tag !== TAG.SEQUENCE) throw badDer(`csrattrs: item ${i} is neither an OID nor an Attribute`);
      const parts = children(der, item);
      if (parts.length !== 2 || parts[0]!.tag !== TAG.OID || parts[1]!.tag !== TAG.SET) throw badDer(`csrattrs: item ${i} is not an Attribute { type, values }`);
      return { attribute: decodeOid(content(der, parts[0]!)), values: children(der, parts[1]!).map((v) => whole(der, v)) };
    });
  } catch (err) {
    if (err instanceof HallmarkError && err.code === 'BAD_DER' && !err.message.startsWith('csrattrs')) throw badDer(`csrattrs: ${err.message}`);
    throw err;
  }
}

// ---------------------------------------------------------------- serverkeygen (§4.4.2)

const CRLF = '\r\n';

/**
 * RFC 7030 §4.4.2 serverkeygen response: multipart/mixed with an application/pkcs8 part (the
 * private key) and an application/pkcs7-mime; smime-type=certs-only part, both base64. The boundary
 * is random (base64 bodies cannot contain "--", so it cannot collide with the content anyway).
 */
export function renderServerKeygenResponse(privateKeyPkcs8Der: Buffer, certsOnlyDer: Buffer): { contentType: string; body: string } {
  const boundary = `est-${randomBytes(12).toString('hex')}`;
  // encodeBase64Body ends with CRLF, which is the CRLF that belongs to the following delimiter.
  const body =
    `--${boundary}${CRLF}Content-Type: application/pkcs8${CRLF}Content-Transfer-Encoding: base64${CRLF}${CRLF}` +
    encodeBase64Body(privateKeyPkcs8Der) +
    `--${boundary}${CRLF}Content-Type: application/pkcs7-mime; smime-type=certs-only${CRLF}Content-Transfer-Encoding: base64${CRLF}${CRLF}` +
    encodeBase64Body(certsOnlyDer) +
    `--${boundary}--${CRLF}`;
  return { contentType: `multipart/mixed; boundary=${boundary}`, body };
}

/** RFC 2046 §5.1.1 boundary characters, 1 to 70 of them, not ending in a space. */
const BOUNDARY = /^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$/;

/** A header parameter value (token or quoted string). */
function headerParam(value: string, name: string): string | undefined {
  const re = new RegExp(`;\\s*${name}\\s*=\\s*(?:"([^"]*)"|([^;\\s]+))`, 'i');
  const m = re.exec(value);
  return m ? (m[1] ?? m[2]) : undefined;
}

/** Splits a multipart body into its parts' raw text (headers and content), per RFC 2046 §5.1.1. */
function multipartParts(text: string, boundary: string): string[] {
  const delimiter = `--${boundary}`;
  // The first delimiter may open the body; every later one must start a line.
  let at = text.startsWith(delimiter) ? 0 : text.indexOf(`\n${delimiter}`);
  if (at < 0) throw badRequest(`multipart body has no boundary "${boundary}"`);
  if (at > 0) at += 1;
  const parts: string[] = [];
  for (;;) {
    let after = at + delimiter.length;
    if (text.startsWith('--', after)) return parts; // close delimiter; the epilogue is ignored
    while (text[after] === ' ' || text[after] === '\t') after++; // transport padding
    if (text.startsWith('\r\n', after)) after += 2;
    else if (text[after] === '\n') after += 1;
    else throw badRequest('multipart body: a boundary line has trailing characters');
    const next = text.indexOf(`\n${delimiter}`, after - 1);
    if (next < 0) throw badRequest('multipart body is not terminated (truncated?)');
    parts.push(text.slice(after, next > 0 && text[next - 1] === '\r' ? next - 1 : next));
    at = next + 1;
  }
}

/** The headers (lower-case names, unfolded) and content of a MIME part. */
function splitPart(part: string): { headers: Map<string, string>; body: string } {
  const m = /\r?\n\r?\n/.exec(part);
  const headerText = part.startsWith('\r\n') || part.startsWith('\n') ? '' : m ? part.slice(0, m.index) : part;
  const body = headerText === '' ? part.replace(/^\r?\n/, '') : m ? part.slice(m.index + m[0].length) : '';
  const headers = new Map<string, string>();
  for (const line of headerText.replace(/\r?\n[ \t]+/g, ' ').split(/\r?\n/)) {
    if (line === '') continue;
    const colon = line.indexOf(':');
    if (colon <= 0) throw badRequest(`multipart body: bad part header ${JSON.stringify(line.slice(0, 80))}`);
    headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  return { headers, body };
}

/**
 * The inverse of renderServerKeygenResponse (for the device client and tests): finds the
 * application/pkcs8 and the certs-only part whatever their order and decodes their base64.
 * Other parts are ignored. `maxBytes` bounds the whole body (default 1 MiB).
 */
export function parseServerKeygenResponse(contentType: string, body: Buffer | string, maxBytes = DEFAULT_MAX_BYTES): { privateKeyPkcs8: Buffer; certsOnly: Buffer } {
  if (body.length > maxBytes) throw tooLarge('serverkeygen response', body.length, maxBytes);
  const mediaType = contentType.split(';')[0]!.trim().toLowerCase();
  if (mediaType !== 'multipart/mixed') throw badRequest(`serverkeygen response is ${mediaType || 'untyped'}, not multipart/mixed`);
  const boundary = headerParam(contentType, 'boundary');
  if (boundary === undefined || !BOUNDARY.test(boundary)) throw badRequest('serverkeygen response: missing or invalid multipart boundary');
  const text = typeof body === 'string' ? body : body.toString('latin1');
  let privateKeyPkcs8: Buffer | undefined;
  let certsOnly: Buffer | undefined;
  for (const part of multipartParts(text, boundary)) {
    const { headers, body: partBody } = splitPart(part);
    const type = headers.get('content-type') ?? '';
    const partMedia = type.split(';')[0]!.trim().toLowerCase();
    let which: 'key' | 'certs';
    if (partMedia === 'application/pkcs8') {
      which = 'key';
    } else if (partMedia === 'application/pkcs7-mime') {
      const smime = headerParam(type, 'smime-type')?.toLowerCase();
      if (smime === 'server-generated-key') throw badRequest('serverkeygen response: encrypted server-generated keys (smime-type=server-generated-key) are not supported');
      if (smime !== undefined && smime !== 'certs-only') throw badRequest(`serverkeygen response: unexpected smime-type ${smime}`);
      which = 'certs';
    } else {
      continue;
    }
    const cte = headers.get('content-transfer-encoding')?.toLowerCase();
    if (cte !== undefined && cte !== 'base64') throw badRequest(`serverkeygen response: ${partMedia} part has Content-Transfer-Encoding ${cte}, not base64`);
    const der = decodeBase64Body(partBody, maxBytes);
    readWhole(der, TAG.SEQUENCE, partMedia); // one DER SEQUENCE (PKCS#8 or ContentInfo), else BAD_DER
    if (which === 'key') {
      if (privateKeyPkcs8) throw badRequest('serverkeygen response has two application/pkcs8 parts');
      privateKeyPkcs8 = der;
    } else {
      if (certsOnly) throw badRequest('serverkeygen response has two application/pkcs7-mime parts');
      certsOnly = der;
    }
  }
  if (!privateKeyPkcs8) throw badRequest('serverkeygen response has no application/pkcs8 part');
  if (!certsOnly) throw badRequest('serverkeygen response has no application/pkcs7-mime; smime-type=certs-only part');
  return { privateKeyPkcs8, certsOnly };
}

// ---------------------------------------------------------------- channel binding (§3.5)

export type ChannelBinding = { type: 'tls-unique' | 'tls-exporter'; value: Buffer };

function channelBinding(socket: TLSSocket, isServer: boolean): ChannelBinding | undefined {
  const protocol = socket.getProtocol?.();
  if (protocol === 'TLSv1.3') {
    // RFC 9266: 32 bytes of exporter output, label EXPORTER-Channel-Binding, empty context (in TLS 1.3
    // "no context" and an empty one give the same exporter value, RFC 8446 §7.5).
    try {
      const value = socket.exportKeyingMaterial(32, 'EXPORTER-Channel-Binding', Buffer.alloc(0));
      return value && value.length > 0 ? { type: 'tls-exporter', value } : undefined;
    } catch {
      return undefined; // not connected (yet) or already destroyed
    }
  }
  if (protocol === 'TLSv1.2' || protocol === 'TLSv1.1' || protocol === 'TLSv1') {
    // RFC 5929 tls-unique: the first Finished message of the latest handshake. In a full handshake
    // the client sends it first; in an abbreviated (resumed) one the server does.
    const serverSentFirst = socket.isSessionReused();
    const value = isServer === serverSentFirst ? socket.getFinished() : socket.getPeerFinished();
    return value && value.length > 0 ? { type: 'tls-unique', value } : undefined;
  }
  return undefined;
}

/** RFC 7030 §3.5 channel binding for the server side of a TLS socket (tls-unique for TLS ≤ 1.2, tls-exporter for TLS 1.3). undefined when not available. */
export function serverChannelBinding(socket: TLSSocket): ChannelBinding | undefined {
  return channelBinding(socket, true);
}

/** The client-side counterpart of serverChannelBinding: equal values on both ends of one connection. */
export function clientChannelBinding(socket: TLSSocket): ChannelBinding | undefined {
  return channelBinding(socket, false);
}

// ---------------------------------------------------------------- challengePassword

const UTF8 = new TextDecoder('utf-8', { fatal: true });

/**
 * The challengePassword attribute (1.2.840.113549.1.9.7) of a CSR as text, or undefined when it has
 * none. PrintableString, UTF8String, IA5String and TeletexString (read as Latin-1, as OpenSSL does)
 * are accepted; a repeated or multi-valued attribute or another string type is refused.
 */
export function csrChallengePassword(csr: ParsedCsr): string | undefined {
  const attrs = csr.attributes.filter((a) => a.oid === OID_CHALLENGE_PASSWORD);
  if (attrs.length === 0) return undefined;
  if (attrs.length > 1 || attrs[0]!.values.length !== 1) throw badRequest('CSR challengePassword must be one attribute with one value');
  const v = attrs[0]!.values[0]!;
  const t = readTlv(v, 0);
  if (t.end !== v.length) throw badDer('CSR challengePassword: trailing bytes');
  const bytes = content(v, t);
  switch (t.tag) {
    case TAG.UTF8_STRING:
      try { return UTF8.decode(bytes); } catch { throw badDer('CSR challengePassword: invalid UTF-8'); }
    case TAG.PRINTABLE_STRING:
    case TAG.IA5_STRING:
      if (bytes.some((b) => b > 0x7f)) throw badDer('CSR challengePassword: non-ASCII byte in an ASCII string type');
      return bytes.toString('ascii');
    case 0x14: // TeletexString
      return bytes.toString('latin1');
    default:
      throw badRequest(`CSR challengePassword has unsupported string type (tag 0x${t.tag.toString(16)})`);
  }
}
