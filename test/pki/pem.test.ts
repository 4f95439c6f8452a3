import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, test } from 'node:test';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { seq, tlv, TAG } from '../../src/pki/der.js';
import { SIZE_LIMITS, decodeOne, decodePemBlocks, encodePem } from '../../src/pki/pem.js';
import { hasCode } from '../helpers/assertions.js';


const CSR_LABELS = ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST'] as const;
/** A DER SEQUENCE of about `n` bytes (starts with 0x30 like every certificate and CSR). */
const derOf = (n: number): Buffer => seq(tlv(TAG.OCTET_STRING, randomBytes(n)));
const sample = derOf(700);

describe('encodePem / decodeOne round trip', () => {
  test('PEM: 64-character lines, BEGIN/END with the label, decodes to the same DER', () => {
    const pem = encodePem('CERTIFICATE REQUEST', sample);
    const lines = pem.trimEnd().split('\n');
    assert.equal(lines[0], '-----BEGIN CERTIFICATE REQUEST-----');
    assert.equal(lines.at(-1), '-----END CERTIFICATE REQUEST-----');
    for (const l of lines.slice(1, -2)) assert.equal(l.length, 64);
    assert.ok(lines.at(-2)!.length <= 64 && lines.at(-2)!.length > 0);
    assert.ok(decodeOne(pem, CSR_LABELS, SIZE_LIMITS.csr).equals(sample));
    assert.ok(decodeOne(Buffer.from(pem), CSR_LABELS, SIZE_LIMITS.csr).equals(sample));
  });

  test('CRLF line endings, surrounding text and the NEW CERTIFICATE REQUEST label are accepted', () => {
    const crlf = encodePem('NEW CERTIFICATE REQUEST', sample).replace(/\n/g, '\r\n');
    assert.ok(decodeOne(`Some explanatory text\r\n${crlf}\r\ntrailer`, CSR_LABELS, SIZE_LIMITS.csr).equals(sample));
  });

  test('raw DER is accepted as is', () => {
    const out = decodeOne(sample, CSR_LABELS, SIZE_LIMITS.csr);
    assert.ok(out.equals(sample));
  });

  test('bare base64 (as EST sends it), with or without line breaks, is accepted', () => {
    const b64 = sample.toString('base64');
    assert.ok(decodeOne(b64, CSR_LABELS, SIZE_LIMITS.csr).equals(sample));
    assert.ok(decodeOne(b64.replace(/(.{76})/g, '$1\r\n'), CSR_LABELS, SIZE_LIMITS.csr).equals(sample));
    assert.ok(decodeOne(Buffer.from(b64), CSR_LABELS, SIZE_LIMITS.csr).equals(sample));
  });

  test('decodePemBlocks returns every block of a chain in order', () => {
    const a = derOf(100);
    const b = derOf(200);
    const text = `subject=CN=leaf\n${encodePem('CERTIFICATE', a)}\nissuer=CN=ca\n${encodePem('CERTIFICATE', b)}`;
    const blocks = decodePemBlocks(text, SIZE_LIMITS.chain);
    assert.deepEqual(blocks.map((x) => x.label), ['CERTIFICATE', 'CERTIFICATE']);
    assert.ok(blocks[0]!.der.equals(a));
    assert.ok(blocks[1]!.der.equals(b));
  });
});

function editLine(text: string, index: number, edit: (line: string) => string): string {
  const lines = text.split('\n');
  lines[index] = edit(lines[index]!);
  return lines.join('\n');
}

describe('broken PEM -> BAD_PEM', () => {
  const pem = encodePem('CERTIFICATE REQUEST', sample);
  const cases: Record<string, string> = {
    'truncated in the middle of the base64': pem.slice(0, Math.floor(pem.length / 2)),
    'END line missing': pem.replace('-----END CERTIFICATE REQUEST-----\n', ''),
    'END line cut short': pem.replace('-----END CERTIFICATE REQUEST-----\n', '-----END CERTIF'),
    'wrong label': encodePem('CERTIFICATE', sample),
    'private key label': encodePem('PRIVATE KEY', sample),
    'BEGIN and END labels differ': pem.replace('-----END CERTIFICATE REQUEST-----', '-----END CERTIFICATE-----'),
    'character outside base64': editLine(pem, 1, (l) => '*' + l.slice(1)),
    'base64 with a character dropped (length not a multiple of 4)': editLine(pem, 1, (l) => l.slice(1)),
    'empty body': '-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n',
    'legacy encrypted headers': pem.replace('-----\n', '-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00\n\n'),
    'two blocks where one is expected': pem + pem,
    'no PEM, no DER, no base64': 'hello, world',
    'empty input': '',
  };
  for (const [name, text] of Object.entries(cases)) {
    test(name, () => {
      assert.throws(() => decodeOne(text, CSR_LABELS, SIZE_LIMITS.csr), hasCode('BAD_PEM'));
    });
  }

  test('a block without END followed by a complete block is refused (not merged)', () => {
    const broken = pem.replace('-----END CERTIFICATE REQUEST-----\n', '');
    assert.throws(() => decodePemBlocks(broken + encodePem('CERTIFICATE', sample), SIZE_LIMITS.chain), hasCode('BAD_PEM'));
  });

  test('decodePemBlocks with no block at all', () => {
    assert.throws(() => decodePemBlocks('nothing here', SIZE_LIMITS.chain), hasCode('BAD_PEM'));
  });
});

describe('size limits -> INPUT_TOO_LARGE', () => {
  const limit = SIZE_LIMITS.csr;
  const big = derOf(limit + 10);

  test('PEM whose DER is over the limit', () => {
    // The PEM text (4/3 of the DER plus newlines) is under twice the limit, so the DER check decides.
    assert.throws(() => decodeOne(encodePem('CERTIFICATE REQUEST', big), CSR_LABELS, limit), hasCode('INPUT_TOO_LARGE'));
  });

  test('text over twice the limit is refused before parsing', () => {
    const huge = 'A'.repeat(limit * 2 + 1);
    assert.throws(() => decodeOne(huge, CSR_LABELS, limit), hasCode('INPUT_TOO_LARGE'));
    assert.throws(() => decodePemBlocks(huge, limit), hasCode('INPUT_TOO_LARGE'));
  });

  test('raw DER over the limit', () => {
    assert.throws(() => decodeOne(big, CSR_LABELS, limit), hasCode('INPUT_TOO_LARGE'));
  });

  test('bare base64 whose DER is over the limit', () => {
    assert.throws(() => decodeOne(big.toString('base64'), CSR_LABELS, limit), hasCode('INPUT_TOO_LARGE'));
  });

  test('exactly at the limit is accepted', () => {
    const atLimit = Buffer.concat([Buffer.from([0x30, 0x83]), Buffer.alloc(limit - 2, 0)]);
    assert.equal(atLimit.length, limit);
    assert.equal(decodeOne(atLimit, CSR_LABELS, limit).length, limit);
    assert.equal(decodeOne(encodePem('CERTIFICATE REQUEST', atLimit), CSR_LABELS, limit).length, limit);
  });
});
