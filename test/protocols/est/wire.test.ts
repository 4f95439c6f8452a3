import assert from 'node:assert/strict';
import { createPrivateKey, createPublicKey, generateKeyPairSync, sign as cryptoSign, verify as cryptoVerify } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as tls from 'node:tls';
import { HallmarkError, type ErrorCode } from '../../../src/errors.js';
import { createCsr, OID_CHALLENGE_PASSWORD, parseCsr } from '../../../src/pki/csr.js';
import { children, oid, readTlv, readWhole, seq, set, tlv, smallInteger } from '../../../src/pki/der.js';
import { encodeNameString } from '../../../src/pki/names.js';
import { decodePemBlocks, encodePem } from '../../../src/pki/pem.js';
import {
  clientChannelBinding,
  csrChallengePassword,
  decodeBase64Body,
  decodeCertsOnly,
  decodeCsrAttrs,
  encodeBase64Body,
  encodeCertsOnly,
  encodeCsrAttrs,
  parseServerKeygenResponse,
  renderServerKeygenResponse,
  serverChannelBinding,
  type CsrAttr,
} from '../../../src/protocols/est/wire.js';
import { openssl } from '../../pki/fixtures.js';

const hasCode = (code: ErrorCode, message?: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
  if (message) assert.match(err.message, message);
  return true;
};

let dir: string;
/** root (self-signed), intermediate (signed by root), leaf (signed by intermediate): DER and PEM paths. */
let chain: Buffer[];
let chainPem: string;
/** intermediate and root only */
let casPem: string;
let leafKeyPath: string;
let leafPemPath: string;
let tlsKeyPem: string;
let tlsCertPem: string;

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'hallmark-est-wire-'));
  const p = (name: string): string => join(dir, name);
  openssl(['req', '-x509', ...EC, '-keyout', p('root.key'), '-out', p('root.pem'), '-subj', '/CN=EST Test Root', '-days', '2']);
  openssl(['req', '-new', ...EC, '-keyout', p('inter.key'), '-out', p('inter.csr'), '-subj', '/CN=EST Test Issuing']);
  writeFileSync(p('ca.ext'), 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n');
  openssl(['x509', '-req', '-in', p('inter.csr'), '-CA', p('root.pem'), '-CAkey', p('root.key'), '-CAcreateserial', '-out', p('inter.pem'), '-days', '2', '-extfile', p('ca.ext')]);
  openssl(['req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('leaf.key'), '-out', p('leaf.csr'), '-subj', '/CN=device-1']);
  openssl(['x509', '-req', '-in', p('leaf.csr'), '-CA', p('inter.pem'), '-CAkey', p('inter.key'), '-CAcreateserial', '-out', p('leaf.pem'), '-days', '2']);
  const pems = ['leaf.pem', 'inter.pem', 'root.pem'].map((f) => readFileSync(p(f), 'utf8'));
  chain = pems.map((pem) => decodePemBlocks(pem, 64 * 1024)[0]!.der);
  chainPem = p('chain.pem');
  writeFileSync(chainPem, pems.join(''));
  casPem = p('cas.pem');
  writeFileSync(casPem, pems.slice(1).join(''));
  leafKeyPath = p('leaf.key');
  leafPemPath = p('leaf.pem');
  openssl(['req', '-x509', ...EC, '-keyout', p('tls.key'), '-out', p('tls.pem'), '-subj', '/CN=localhost', '-days', '2', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1']);
  tlsKeyPem = readFileSync(p('tls.key'), 'utf8');
  tlsCertPem = readFileSync(p('tls.pem'), 'utf8');
});

after(() => rmSync(dir, { recursive: true, force: true }));

/** The certificates `openssl pkcs7 -print_certs` finds in a DER PKCS#7. */
function opensslPrintCerts(der: Buffer): Buffer[] {
  const text = openssl(['pkcs7', '-inform', 'DER', '-print_certs'], der).stdout.toString('utf8');
  if (!text.includes('-----BEGIN')) return [];
  return decodePemBlocks(text, 1024 * 1024).map((b) => b.der);
}

// ---------------------------------------------------------------- certs-only

describe('certs-only CMS', () => {
  test('encodeCertsOnly: openssl pkcs7 prints the same certificates in the same order', () => {
    const der = encodeCertsOnly(chain);
    assert.deepEqual(opensslPrintCerts(der), chain);
    assert.deepEqual(opensslPrintCerts(encodeCertsOnly([chain[0]!])), [chain[0]]);
    assert.deepEqual(decodeCertsOnly(der), chain);
  });

  test('encodeCertsOnly is byte for byte what openssl crl2pkcs7 -nocrl writes', () => {
    const fromOpenssl = openssl(['crl2pkcs7', '-nocrl', '-certfile', chainPem, '-outform', 'DER']).stdout;
    assert.ok(encodeCertsOnly(chain).equals(fromOpenssl));
    // and OpenSSL re-encodes ours unchanged
    assert.ok(openssl(['pkcs7', '-inform', 'DER', '-outform', 'DER'], encodeCertsOnly(chain)).stdout.equals(encodeCertsOnly(chain)));
  });

  test('the structure is SignedData v1, no digests, id-data without content, no signers', () => {
    const text = openssl(['asn1parse', '-inform', 'DER', '-i'], encodeCertsOnly(chain)).stdout.toString('utf8');
    assert.match(text, /OBJECT\s+:pkcs7-signedData/);
    assert.match(text, /INTEGER\s+:01/);
    assert.match(text, /OBJECT\s+:pkcs7-data/);
  });

  test('an empty list gives a certs-only without certificates that openssl reads', () => {
    const der = encodeCertsOnly([]);
    assert.deepEqual(decodeCertsOnly(der), []);
    openssl(['pkcs7', '-inform', 'DER', '-noout'], der);
    assert.deepEqual(opensslPrintCerts(der), []);
  });

  test('decodeCertsOnly reads openssl crl2pkcs7 output', () => {
    const der = openssl(['crl2pkcs7', '-nocrl', '-certfile', chainPem, '-outform', 'DER']).stdout;
    assert.deepEqual(decodeCertsOnly(der), chain);
    const one = openssl(['crl2pkcs7', '-nocrl', '-certfile', leafPemPath, '-outform', 'DER']).stdout;
    assert.deepEqual(decodeCertsOnly(one), [chain[0]]);
  });

  test('decodeCertsOnly accepts a SignedData with signers and content, ignoring the signers', () => {
    const signed = openssl(['cms', '-sign', '-signer', leafPemPath, '-inkey', leafKeyPath, '-certfile', casPem, '-outform', 'DER', '-nodetach', '-binary'], Buffer.from('hello')).stdout;
    const certs = decodeCertsOnly(signed);
    const key = (b: Buffer): string => b.toString('hex');
    assert.deepEqual(new Set(certs.map(key)), new Set(chain.map(key)));
  });

  test('decodeCertsOnly skips attribute-certificate choices and accepts crls', () => {
    const head = Buffer.from('020101310030 0b06092a864886f70d010701'.replace(/ /g, ''), 'hex');
    const fakeCrl = seq(seq(smallInteger(1)), seq(oid('1.2.840.10045.4.3.2')), tlv(0x03, Buffer.from([0])));
    const sd = seq(head, tlv(0xa0, chain[1]!, tlv(0xa2, seq()), chain[0]!), tlv(0xa1, fakeCrl), set());
    const der = seq(oid('1.2.840.113549.1.7.2'), tlv(0xa0, sd));
    assert.deepEqual(decodeCertsOnly(der), [chain[1], chain[0]]);
  });

  test('wrong content type: id-data, envelopedData, and an openssl-made enveloped CMS', () => {
    const good = encodeCertsOnly(chain);
    const [, explicit] = children(good, readWhole(good, 0x30, 'ContentInfo'));
    for (const other of ['1.2.840.113549.1.7.1', '1.2.840.113549.1.7.3']) {
      const der = seq(oid(other), good.subarray(explicit!.start, explicit!.end));
      assert.throws(() => decodeCertsOnly(der), hasCode('BAD_DER', /not SignedData/));
    }
    const enveloped = openssl(['cms', '-encrypt', '-aes128', '-outform', 'DER', '-binary', leafPemPath], Buffer.from('x')).stdout;
    assert.throws(() => decodeCertsOnly(enveloped), hasCode('BAD_DER', /1\.2\.840\.113549\.1\.7\.3 is not SignedData/));
  });

  test('every truncation and a trailing byte are refused with BAD_DER', () => {
    const der = encodeCertsOnly(chain.slice(0, 2));
    for (let n = 0; n < der.length; n += n < 64 ? 1 : 37) {
      assert.throws(() => decodeCertsOnly(der.subarray(0, n)), hasCode('BAD_DER'), `truncated to ${n}`);
    }
    assert.throws(() => decodeCertsOnly(Buffer.concat([der, Buffer.from([0])])), hasCode('BAD_DER', /trailing/));
  });

  test('garbage, BER indefinite length and a non-certificate element are refused with BAD_DER', () => {
    assert.throws(() => decodeCertsOnly(Buffer.from('hello, world')), hasCode('BAD_DER'));
    assert.throws(() => decodeCertsOnly(Buffer.alloc(0)), hasCode('BAD_DER'));
    assert.throws(() => decodeCertsOnly(Buffer.from('3080060a', 'hex')), hasCode('BAD_DER'));
    const head = Buffer.from('0201013100300b06092a864886f70d010701', 'hex');
    const notCert = seq(oid('1.2.840.113549.1.7.2'), tlv(0xa0, seq(head, tlv(0xa0, seq(smallInteger(5))), set())));
    assert.throws(() => decodeCertsOnly(notCert), hasCode('BAD_DER', /not a Certificate/));
    const noSigners = seq(oid('1.2.840.113549.1.7.2'), tlv(0xa0, seq(head, tlv(0xa0, chain[0]!))));
    assert.throws(() => decodeCertsOnly(noSigners), hasCode('BAD_DER'));
  });

  test('every single-bit flip in the envelope gives a certificate list or BAD_DER, never another error', () => {
    const der = encodeCertsOnly(chain);
    for (let i = 0; i < 120; i++) {
      for (let bit = 0; bit < 8; bit++) {
        const copy = Buffer.from(der);
        copy[i]! ^= 1 << bit;
        try { decodeCertsOnly(copy); } catch (err) { hasCode('BAD_DER')(err); }
      }
    }
  });

  test('a large bundle (long-form lengths) matches openssl both ways', () => {
    const many = Array.from({ length: 300 }, (_, i) => chain[i % 3]!);
    const der = encodeCertsOnly(many);
    assert.ok(der.length > 0x10000);
    assert.deepEqual(opensslPrintCerts(der), many);
    assert.deepEqual(decodeCertsOnly(der), many);
  });

  test('oversize input is refused with INPUT_TOO_LARGE (given limit and the 1 MiB default)', () => {
    const der = encodeCertsOnly(chain);
    assert.throws(() => decodeCertsOnly(der, der.length - 1), hasCode('INPUT_TOO_LARGE'));
    assert.deepEqual(decodeCertsOnly(der, der.length), chain);
    assert.throws(() => decodeCertsOnly(Buffer.alloc(1024 * 1024 + 1, 0x30)), hasCode('INPUT_TOO_LARGE'));
  });

  test('encodeCertsOnly refuses something that is not one DER element', () => {
    assert.throws(() => encodeCertsOnly([Buffer.from('nope')]), hasCode('BAD_DER'));
    assert.throws(() => encodeCertsOnly([Buffer.concat([chain[0]!, Buffer.from([0])])]), hasCode('BAD_DER'));
  });
});

// ---------------------------------------------------------------- base64 bodies

describe('base64 bodies', () => {
  const data = Buffer.from(Array.from({ length: 500 }, (_, i) => (i * 37) & 0xff));

  test('encodeBase64Body writes 64-character lines ended by CRLF and round-trips', () => {
    const text = encodeBase64Body(data);
    assert.ok(text.endsWith('\r\n'));
    const lines = text.split('\r\n').slice(0, -1);
    assert.ok(lines.slice(0, -1).every((l) => l.length === 64));
    assert.ok(lines.at(-1)!.length <= 64 && lines.at(-1)!.length > 0);
    assert.ok(!/\n(?<!\r\n)/.test(text.replace(/\r\n/g, '')));
    assert.deepEqual(decodeBase64Body(text, 1000), data);
    assert.equal(encodeBase64Body(Buffer.alloc(0)), '');
    // openssl reads it
    assert.deepEqual(openssl(['base64', '-d'], text.replace(/\r\n/g, '\n')).stdout, data);
  });

  test('decodeBase64Body accepts LF and CRLF wrapping, surrounding whitespace, one line, Buffer input', () => {
    const b64 = data.toString('base64');
    const lf = openssl(['base64'], data).stdout.toString('latin1'); // 64-char lines, LF
    assert.deepEqual(decodeBase64Body(lf, 1000), data);
    assert.deepEqual(decodeBase64Body(lf.replace(/\n/g, '\r\n'), 1000), data);
    assert.deepEqual(decodeBase64Body(`\r\n  ${b64}\r\n\r\n`, 1000), data);
    assert.deepEqual(decodeBase64Body(Buffer.from(b64), 1000), data);
    assert.deepEqual(decodeBase64Body(b64.replace(/(.{76})/g, '$1\n'), 1000), data);
  });

  test('decodeBase64Body accepts PEM armour of a CSR (LF or CRLF)', () => {
    const csr = createCsr({ subject: encodeNameString('CN=device-1'), privateKey: generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey });
    const pem = encodePem('CERTIFICATE REQUEST', csr);
    assert.deepEqual(decodeBase64Body(pem, 64 * 1024), csr);
    assert.deepEqual(decodeBase64Body(Buffer.from(pem.replace(/\n/g, '\r\n')), 64 * 1024), csr);
    assert.deepEqual(decodeBase64Body(`\n\n${encodePem('NEW CERTIFICATE REQUEST', csr)}  \n`, 64 * 1024), csr);
    const opensslPem = openssl(['req', '-new', ...EC, '-keyout', '/dev/null', '-subj', '/CN=x']).stdout.toString('utf8');
    assert.ok(opensslPem.startsWith('-----BEGIN CERTIFICATE REQUEST-----'));
    parseCsr(decodeBase64Body(opensslPem, 64 * 1024));
  });

  test('garbage is refused with BAD_REQUEST "body is not base64"', () => {
    const notB64 = hasCode('BAD_REQUEST', /^body is not base64/);
    for (const garbage of ['', '   \r\n ', 'not base64!', '%%%%', 'QUJD=', 'QUJ', 'QQ=A', 'QQ===', '====', 'QUJD\u00e9QUJD', 'QR==', 'QUK=', '{"csr":"QUJD"}', 'QUJD\0QUJD']) {
      assert.throws(() => decodeBase64Body(garbage, 1000), notB64, JSON.stringify(garbage));
    }
    assert.throws(() => decodeBase64Body(Buffer.from([0xff, 0xfe, 0x41, 0x41]), 1000), notB64);
    assert.throws(() => decodeBase64Body(Buffer.from('MII\xa0Q', 'latin1'), 1000), notB64);
  });

  test('bad PEM armour is refused with BAD_REQUEST', () => {
    const der = Buffer.from('300a', 'hex');
    const notB64 = hasCode('BAD_REQUEST', /^body is not base64/);
    assert.throws(() => decodeBase64Body(encodePem('PRIVATE KEY', der), 100), notB64);
    assert.throws(() => decodeBase64Body(encodePem('CERTIFICATE REQUEST', der).replace('END CERTIFICATE REQUEST', 'END PKCS7'), 100), notB64);
    assert.throws(() => decodeBase64Body(encodePem('CERTIFICATE REQUEST', der) + encodePem('CERTIFICATE REQUEST', der), 100), notB64);
    assert.throws(() => decodeBase64Body(encodePem('CERTIFICATE REQUEST', der).slice(0, -20), 100), notB64);
    assert.throws(() => decodeBase64Body('-----BEGIN CERTIFICATE REQUEST-----\nProc-Type: 4,ENCRYPTED\n\nMAo=\n-----END CERTIFICATE REQUEST-----\n', 100), notB64);
  });

  test('decoded size over maxBytes is refused with INPUT_TOO_LARGE; exactly maxBytes is accepted', () => {
    assert.deepEqual(decodeBase64Body(encodeBase64Body(data), 500), data);
    assert.throws(() => decodeBase64Body(encodeBase64Body(data), 499), hasCode('INPUT_TOO_LARGE'));
    assert.throws(() => decodeBase64Body(encodePem('CERTIFICATE REQUEST', data), 499), hasCode('INPUT_TOO_LARGE'));
    // a huge body is refused before any string work, whatever it holds
    assert.throws(() => decodeBase64Body(Buffer.alloc(10 * 1024 * 1024, 0x41), 64 * 1024), hasCode('INPUT_TOO_LARGE'));
    assert.throws(() => decodeBase64Body('!'.repeat(200_000), 64 * 1024), hasCode('INPUT_TOO_LARGE'));
  });
});

// ---------------------------------------------------------------- CsrAttrs

describe('CsrAttrs', () => {
  // RFC 7030 §4.5.2 example.
  const RFC_EXAMPLE = Buffer.from('MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw==', 'base64');
  const RFC_ITEMS: CsrAttr[] = [
    { oid: '1.2.840.113549.1.9.7' },
    { attribute: '1.2.840.10045.2.1', values: [oid('1.3.132.0.34')] },
    { attribute: '1.2.840.113549.1.9.14', values: [oid('1.3.6.1.1.1.1.22')] },
    { oid: '1.2.840.10045.4.3.3' },
  ];

  test('the RFC 7030 example decodes, and encodes back byte for byte', () => {
    assert.deepEqual(decodeCsrAttrs(RFC_EXAMPLE), RFC_ITEMS);
    assert.ok(encodeCsrAttrs(RFC_ITEMS).equals(RFC_EXAMPLE));
    assert.deepEqual(decodeCsrAttrs(decodeBase64Body(encodeBase64Body(encodeCsrAttrs(RFC_ITEMS)), 1000)), RFC_ITEMS);
  });

  test('openssl asn1parse reads encodeCsrAttrs output', () => {
    const der = encodeCsrAttrs([...RFC_ITEMS, { attribute: '2.5.4.3', values: [tlv(0x0c, Buffer.from('b')), tlv(0x0c, Buffer.from('a'))] }]);
    const text = openssl(['asn1parse', '-inform', 'DER', '-i'], der).stdout.toString('utf8');
    for (const name of ['challengePassword', 'id-ecPublicKey', 'secp384r1', 'Extension Request', '1.3.6.1.1.1.1.22', 'ecdsa-with-SHA384', 'commonName']) {
      assert.ok(text.includes(`:${name}`), `${name} in\n${text}`);
    }
    assert.ok(text.indexOf('UTF8STRING        :a') < text.indexOf('UTF8STRING        :b'), 'SET OF values are DER-sorted');
    assert.ok(!/error/i.test(text));
  });

  test('empty CsrAttrs', () => {
    assert.ok(encodeCsrAttrs([]).equals(Buffer.from('3000', 'hex')));
    assert.deepEqual(decodeCsrAttrs(Buffer.from('3000', 'hex')), []);
  });

  test('malformed CsrAttrs are refused with BAD_DER', () => {
    for (let n = 0; n < RFC_EXAMPLE.length; n++) assert.throws(() => decodeCsrAttrs(RFC_EXAMPLE.subarray(0, n)), hasCode('BAD_DER'), `truncated to ${n}`);
    assert.throws(() => decodeCsrAttrs(Buffer.concat([RFC_EXAMPLE, Buffer.from([0])])), hasCode('BAD_DER'));
    assert.throws(() => decodeCsrAttrs(seq(smallInteger(1))), hasCode('BAD_DER', /neither an OID nor an Attribute/));
    assert.throws(() => decodeCsrAttrs(seq(seq(oid('1.2.3')))), hasCode('BAD_DER', /Attribute/));
    assert.throws(() => decodeCsrAttrs(seq(seq(oid('1.2.3'), seq()))), hasCode('BAD_DER', /Attribute/));
    assert.throws(() => decodeCsrAttrs(set()), hasCode('BAD_DER'));
    assert.throws(() => decodeCsrAttrs(Buffer.from('garbage')), hasCode('BAD_DER'));
  });

  test('oversize CsrAttrs are refused with INPUT_TOO_LARGE', () => {
    assert.throws(() => decodeCsrAttrs(RFC_EXAMPLE, RFC_EXAMPLE.length - 1), hasCode('INPUT_TOO_LARGE'));
    const big = encodeCsrAttrs(Array.from({ length: 7000 }, () => ({ oid: '1.2.840.113549.1.9.7' })));
    assert.throws(() => decodeCsrAttrs(big), hasCode('INPUT_TOO_LARGE'));
    assert.equal(decodeCsrAttrs(big, big.length).length, 7000);
  });

  test('encodeCsrAttrs refuses bad OIDs and values that are not one DER element', () => {
    for (const bad of ['', '1', 'a.b', '3.1', '1.40', '1.2.', '1.02']) {
      assert.throws(() => encodeCsrAttrs([{ oid: bad }]), hasCode('BAD_REQUEST'), bad);
    }
    assert.throws(() => encodeCsrAttrs([{ attribute: '1.2.3', values: [] }]), hasCode('BAD_REQUEST'));
    assert.throws(() => encodeCsrAttrs([{ attribute: '1.2.3', values: [Buffer.from('0500ff', 'hex')] }]), hasCode('BAD_DER'));
  });
});

// ---------------------------------------------------------------- serverkeygen

describe('serverkeygen multipart response', () => {
  const parts = (): { pkcs8: Buffer; certs: Buffer; publicKey: ReturnType<typeof createPublicKey> } => {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    return { pkcs8: privateKey.export({ type: 'pkcs8', format: 'der' }), certs: encodeCertsOnly(chain), publicKey };
  };

  test('round trip; the pkcs8 part loads with crypto.createPrivateKey; the certs part decodes', () => {
    const { pkcs8, certs, publicKey } = parts();
    const { contentType, body } = renderServerKeygenResponse(pkcs8, certs);
    assert.match(contentType, /^multipart\/mixed; boundary=est-[0-9a-f]{24}$/);
    const parsed = parseServerKeygenResponse(contentType, body);
    assert.deepEqual(parsed.privateKeyPkcs8, pkcs8);
    assert.deepEqual(parsed.certsOnly, certs);
    const key = createPrivateKey({ key: parsed.privateKeyPkcs8, format: 'der', type: 'pkcs8' });
    assert.equal(key.asymmetricKeyType, 'ec');
    assert.ok(cryptoVerify('sha256', Buffer.from('m'), publicKey, cryptoSign('sha256', Buffer.from('m'), key)));
    assert.deepEqual(decodeCertsOnly(parsed.certsOnly), chain);
    assert.deepEqual(parseServerKeygenResponse(contentType, Buffer.from(body)), parsed);
  });

  test('the body is RFC 7030 §4.4.2 shaped: CRLF lines, both parts base64, random boundary', () => {
    const { pkcs8, certs } = parts();
    const a = renderServerKeygenResponse(pkcs8, certs);
    const b = renderServerKeygenResponse(pkcs8, certs);
    assert.notEqual(a.contentType, b.contentType);
    const boundary = a.contentType.split('boundary=')[1]!;
    assert.ok(!/[^\r]\n/.test(a.body), 'every line ends with CRLF');
    assert.ok(a.body.split('\r\n').every((l) => l.length <= 76));
    assert.ok(a.body.startsWith(`--${boundary}\r\nContent-Type: application/pkcs8\r\nContent-Transfer-Encoding: base64\r\n\r\n`));
    assert.ok(a.body.includes(`\r\n--${boundary}\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\nContent-Transfer-Encoding: base64\r\n\r\n`));
    assert.ok(a.body.endsWith(`\r\n--${boundary}--\r\n`));
  });

  const part = (type: string, b64: string, nl = '\r\n', cte = 'base64'): string =>
    `Content-Type: ${type}${nl}Content-Transfer-Encoding: ${cte}${nl}${nl}${b64}`;
  const build = (boundary: string, bodies: string[], nl = '\r\n', preamble = '', epilogue = ''): string =>
    preamble + bodies.map((p) => `--${boundary}${nl}${p}${nl}`).join('') + `--${boundary}--${nl}${epilogue}`;

  test('parts in either order, LF line ends, quoted boundary, preamble, epilogue and extra parts', () => {
    const { pkcs8, certs } = parts();
    const keyPart = part('application/pkcs8', pkcs8.toString('base64'), '\n');
    const certPart = part('application/pkcs7-mime; smime-type="certs-only"', encodeBase64Body(certs).replace(/\r\n/g, '\n').trimEnd(), '\n');
    const body = build('simple boundary', [part('text/plain', 'aGk=', '\n'), certPart, keyPart], '\n', 'This is the preamble.\n', 'epilogue\n');
    const parsed = parseServerKeygenResponse('Multipart/Mixed; charset=us-ascii; boundary="simple boundary"', body);
    assert.deepEqual(parsed, { privateKeyPkcs8: pkcs8, certsOnly: certs });
    // folded header, no Content-Transfer-Encoding, no smime-type
    const folded = build('b1', [`Content-Type:\r\n  application/pkcs7-mime\r\n\r\n${certs.toString('base64')}`, `content-type: application/pkcs8\r\n\r\n${pkcs8.toString('base64')}`]);
    assert.deepEqual(parseServerKeygenResponse('multipart/mixed;boundary=b1', folded), { privateKeyPkcs8: pkcs8, certsOnly: certs });
  });

  test('a body without one of its parts is refused', () => {
    const { pkcs8, certs } = parts();
    const keyOnly = build('b', [part('application/pkcs8', pkcs8.toString('base64'))]);
    assert.throws(() => parseServerKeygenResponse('multipart/mixed; boundary=b', keyOnly), hasCode('BAD_REQUEST', /no application\/pkcs7-mime/));
    const certsOnlyBody = build('b', [part('application/pkcs7-mime; smime-type=certs-only', certs.toString('base64'))]);
    assert.throws(() => parseServerKeygenResponse('multipart/mixed; boundary=b', certsOnlyBody), hasCode('BAD_REQUEST', /no application\/pkcs8/));
    assert.throws(() => parseServerKeygenResponse('multipart/mixed; boundary=b', build('b', [])), hasCode('BAD_REQUEST', /no application\/pkcs8/));
  });

  test('a wrong, missing or invalid boundary is refused', () => {
    const { pkcs8, certs } = parts();
    const { contentType, body } = renderServerKeygenResponse(pkcs8, certs);
    assert.throws(() => parseServerKeygenResponse('multipart/mixed; boundary=est-0000', body), hasCode('BAD_REQUEST', /no boundary/));
    assert.throws(() => parseServerKeygenResponse(`${contentType}0`, body), hasCode('BAD_REQUEST', /no boundary|trailing/));
    assert.throws(() => parseServerKeygenResponse('multipart/mixed', body), hasCode('BAD_REQUEST', /boundary/));
    assert.throws(() => parseServerKeygenResponse(`multipart/mixed; boundary=${'x'.repeat(71)}`, body), hasCode('BAD_REQUEST', /boundary/));
    assert.throws(() => parseServerKeygenResponse('multipart/mixed; boundary=""', body), hasCode('BAD_REQUEST', /boundary/));
  });

  test('wrong media type, truncation, bad base64, bad DER, duplicates, other encodings are refused', () => {
    const { pkcs8, certs } = parts();
    const { contentType, body } = renderServerKeygenResponse(pkcs8, certs);
    const ct = 'multipart/mixed; boundary=b';
    const keyPart = part('application/pkcs8', pkcs8.toString('base64'));
    const certPart = part('application/pkcs7-mime; smime-type=certs-only', certs.toString('base64'));
    assert.throws(() => parseServerKeygenResponse('application/pkcs7-mime', body), hasCode('BAD_REQUEST', /not multipart\/mixed/));
    assert.throws(() => parseServerKeygenResponse(contentType, body.slice(0, body.length - 10)), hasCode('BAD_REQUEST', /not terminated/));
    assert.throws(() => parseServerKeygenResponse(contentType, body.slice(0, body.length / 2)), hasCode('BAD_REQUEST'));
    assert.throws(() => parseServerKeygenResponse(ct, build('b', [part('application/pkcs8', 'not base64!'), certPart])), hasCode('BAD_REQUEST', /body is not base64/));
    assert.throws(() => parseServerKeygenResponse(ct, build('b', [part('application/pkcs8', 'AAAA'), certPart])), hasCode('BAD_DER'));
    assert.throws(() => parseServerKeygenResponse(ct, build('b', [keyPart, keyPart, certPart])), hasCode('BAD_REQUEST', /two application\/pkcs8/));
    assert.throws(() => parseServerKeygenResponse(ct, build('b', [keyPart, part('application/pkcs8', pkcs8.toString('binary'), '\r\n', 'binary'), certPart])), hasCode('BAD_REQUEST', /not base64/));
    assert.throws(() => parseServerKeygenResponse(ct, build('b', [keyPart, part('application/pkcs7-mime; smime-type=server-generated-key', certs.toString('base64'))])), hasCode('BAD_REQUEST', /not supported/));
    assert.throws(() => parseServerKeygenResponse(ct, build('b', [`Content-Type application/pkcs8\r\n\r\nAAAA`, keyPart, certPart])), hasCode('BAD_REQUEST', /bad part header/));
    assert.throws(() => parseServerKeygenResponse(ct, build('b', [keyPart, certPart]).replace('--b\r\nContent-Type: application/pkcs7', '--bX\r\nContent-Type: application/pkcs7')), hasCode('BAD_REQUEST', /trailing characters/));
  });

  test('an oversize body or part is refused with INPUT_TOO_LARGE', () => {
    const { pkcs8, certs } = parts();
    const { contentType, body } = renderServerKeygenResponse(pkcs8, certs);
    assert.throws(() => parseServerKeygenResponse(contentType, body, body.length - 1), hasCode('INPUT_TOO_LARGE'));
    assert.throws(() => parseServerKeygenResponse(contentType, body + ' '.repeat(1024 * 1024)), hasCode('INPUT_TOO_LARGE'));
    assert.throws(() => parseServerKeygenResponse(contentType, body, certs.length - 1), hasCode('INPUT_TOO_LARGE'));
  });
});

// ---------------------------------------------------------------- channel binding

type Binding = ReturnType<typeof serverChannelBinding>;

describe('TLS channel binding', () => {
  async function withServer(version: 'TLSv1.2' | 'TLSv1.3', run: (connect: (session?: Buffer) => Promise<{ server: Binding; client: Binding; reused: boolean; session?: Buffer }>) => Promise<void>): Promise<void> {
    let onServer: ((b: Binding) => void) | undefined;
    const server = tls.createServer({ key: tlsKeyPem, cert: tlsCertPem, minVersion: version, maxVersion: version }, (socket) => {
      onServer?.(serverChannelBinding(socket));
      socket.end('ok');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    const connect = (session?: Buffer) => new Promise<{ server: Binding; client: Binding; reused: boolean; session?: Buffer }>((resolve, reject) => {
      const serverBinding = new Promise<Binding>((r) => { onServer = r; });
      let client: Binding;
      let reused = false;
      let newSession: Buffer | undefined;
      const socket = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', ca: tlsCertPem, minVersion: version, maxVersion: version, session }, () => {
        client = clientChannelBinding(socket);
        reused = socket.isSessionReused();
      });
      socket.on('session', (s: Buffer) => { newSession = s; });
      socket.on('error', reject);
      socket.resume();
      socket.on('close', () => { serverBinding.then((s) => resolve({ server: s, client, reused, session: newSession }), reject); });
    });
    try { await run(connect); } finally { await new Promise((r) => server.close(r)); }
  }

  for (const [version, type, length] of [['TLSv1.2', 'tls-unique', 12], ['TLSv1.3', 'tls-exporter', 32]] as const) {
    test(`${version}: ${type}, equal on both ends, different per connection, also on resumption`, { timeout: 30_000 }, async () => {
      await withServer(version, async (connect) => {
        const first = await connect();
        const second = await connect();
        for (const c of [first, second]) {
          assert.ok(c.server && c.client);
          assert.equal(c.server.type, type);
          assert.equal(c.client.type, type);
          assert.equal(c.server.value.length, length);
          assert.ok(c.server.value.some((b) => b !== 0));
          assert.deepEqual(c.server.value, c.client.value);
          assert.equal(c.reused, false);
        }
        assert.notDeepEqual(first.server!.value, second.server!.value);
        // An abbreviated handshake: the server sends the first Finished (tls-unique picks it).
        assert.ok(first.session, 'a session to resume');
        const resumed = await connect(first.session);
        assert.equal(resumed.reused, true);
        assert.ok(resumed.server && resumed.client);
        assert.deepEqual(resumed.server.value, resumed.client.value);
        assert.notDeepEqual(resumed.server.value, first.server!.value);
      });
    });
  }

  test('undefined before a handshake', () => {
    const socket = new tls.TLSSocket(new Socket());
    assert.equal(serverChannelBinding(socket), undefined);
    assert.equal(clientChannelBinding(socket), undefined);
    socket.destroy();
  });
});

// ---------------------------------------------------------------- challengePassword

describe('csrChallengePassword', () => {
  /** string_mask decides the string type OpenSSL picks: utf8only gives UTF8String; default gives PrintableString, else TeletexString. */
  function opensslCsrWithPassword(password: string, extra: readonly string[] = [], stringMask = 'utf8only', configEncoding: BufferEncoding = 'utf8'): Buffer {
    const cfg = join(dir, `req-${Math.random().toString(36).slice(2)}.cnf`);
    // The subject comes from the config: with -subj, OpenSSL 3.0 leaves [req_attributes] out.
    writeFileSync(cfg, `[req]\nprompt = no\nstring_mask = ${stringMask}\ndistinguished_name = dn\nattributes = req_attributes\n[dn]\nCN = device-1\n[req_attributes]\nchallengePassword = ${password}\n`, configEncoding);
    return openssl(['req', '-new', '-config', cfg, '-outform', 'DER', ...extra]).stdout;
  }
  const tagOf = (der: Buffer): number => {
    const attr = parseCsr(der).attributes.find((a) => a.oid === OID_CHALLENGE_PASSWORD)!;
    return readTlv(attr.values[0]!, 0).tag;
  };

  test('openssl req with [req_attributes] challengePassword, an encrypted key (-passin) and -addext', () => {
    const keyPath = join(dir, 'enc.key');
    openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-aes256', '-pass', 'pass:key secret', '-out', keyPath]);
    const der = opensslCsrWithPassword('S3cretPass', ['-key', keyPath, '-passin', 'pass:key secret', '-addext', 'subjectAltName=DNS:device-1.example', '-addext', 'keyUsage=digitalSignature'], 'default');
    const csr = parseCsr(der);
    assert.equal(csr.attributes.length, 2);
    assert.equal(tagOf(der), 0x13);
    assert.equal(csrChallengePassword(csr), 'S3cretPass');
  });

  test('openssl challengePasswords of other string types (IA5String, TeletexString, UTF8String)', () => {
    const ia5 = opensslCsrWithPassword('p@ss&word!', [...EC, '-keyout', '/dev/null'], 'default');
    assert.equal(tagOf(ia5), 0x16);
    assert.equal(csrChallengePassword(parseCsr(ia5)), 'p@ss&word!');
    const teletex = opensslCsrWithPassword('café pass', [...EC, '-keyout', '/dev/null'], 'nombstr', 'latin1');
    assert.equal(tagOf(teletex), 0x14);
    assert.equal(csrChallengePassword(parseCsr(teletex)), 'café pass');
    const utf8 = opensslCsrWithPassword('pässwörd-€ x', [...EC, '-keyout', '/dev/null', '-utf8']);
    assert.equal(tagOf(utf8), 0x0c);
    assert.equal(csrChallengePassword(parseCsr(utf8)), 'pässwörd-€ x');
  });

  test('no challengePassword gives undefined', () => {
    const der = openssl(['req', '-new', ...EC, '-keyout', '/dev/null', '-subj', '/CN=x', '-outform', 'DER', '-addext', 'subjectAltName=DNS:x']).stdout;
    assert.equal(csrChallengePassword(parseCsr(der)), undefined);
  });

  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const csrWith = (...attributes: Buffer[]) => parseCsr(createCsr({ subject: encodeNameString('CN=d'), privateKey, attributes }));
  const pw = (...values: Buffer[]) => seq(oid(OID_CHALLENGE_PASSWORD), set(...values));

  test('each accepted string type, built by hand', () => {
    assert.equal(csrChallengePassword(csrWith(pw(tlv(0x13, Buffer.from('Print 1'))))), 'Print 1');
    assert.equal(csrChallengePassword(csrWith(pw(tlv(0x0c, Buffer.from('ünï', 'utf8'))))), 'ünï');
    assert.equal(csrChallengePassword(csrWith(pw(tlv(0x16, Buffer.from('a@b'))))), 'a@b');
    assert.equal(csrChallengePassword(csrWith(pw(tlv(0x14, Buffer.from('caf\xe9', 'latin1'))))), 'café');
  });

  test('other string types, several values or attributes, and broken strings are refused', () => {
    assert.throws(() => csrChallengePassword(csrWith(pw(tlv(0x1e, Buffer.from('\0a'))))), hasCode('BAD_REQUEST', /string type/));
    assert.throws(() => csrChallengePassword(csrWith(pw(tlv(0x13, Buffer.from('a')), tlv(0x13, Buffer.from('b'))))), hasCode('BAD_REQUEST'));
    assert.throws(() => csrChallengePassword(csrWith(pw(tlv(0x13, Buffer.from('a'))), pw(tlv(0x13, Buffer.from('b'))))), hasCode('BAD_REQUEST'));
    assert.throws(() => csrChallengePassword(csrWith(pw())), hasCode('BAD_REQUEST'));
    assert.throws(() => csrChallengePassword(csrWith(pw(tlv(0x0c, Buffer.from([0xc3, 0x28]))))), hasCode('BAD_DER', /UTF-8/));
    assert.throws(() => csrChallengePassword(csrWith(pw(tlv(0x13, Buffer.from([0xe9]))))), hasCode('BAD_DER'));
  });
});
