import assert from 'node:assert/strict';
import { X509Certificate as NodeX509, createHash, randomBytes, verify as cryptoVerify } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { signCertificate, signingCa } from '../../src/authority/certificate-signer.js';
import { PROFILES } from '../../src/authority/profiles.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { OID, SCHEME_BY_OID, type KeyAlgorithm } from '../../src/pki/algorithms.js';
import { MAX_CERTIFICATE_BYTES, normaliseSerialHex, parseCertificate, serialToHex, sha256Fingerprint } from '../../src/pki/certificate.js';
import { EKU, EXT, decodeAuthorityKeyId, decodeBasicConstraints, decodeKeyUsage, decodeOidSequence, decodeSubjectKeyId, keyIdentifier } from '../../src/pki/extensions.js';
import { encodeNameString, nameToString } from '../../src/pki/names.js';
import { makeTempDir } from '../helpers/tmp.js';
import { NEWKEY_ARGS, generateKey, loadPeculiarX509, memorySigner, openssl, opensslText, opensslVerify, spkiOf, writePems } from './fixtures.js';

const x509 = await loadPeculiarX509();

const hasCode = (...codes: ErrorCode[]) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.ok(codes.includes(err.code), `expected ${codes.join(' or ')}, got ${err.code}: ${err.message}`);
  return true;
};

const tmp = await makeTempDir('hallmark-cert-');
after(() => tmp.cleanup());

/** `openssl req -x509` with a config file naming exactly the extensions we want. */
function opensslSelfSigned(options: { key: keyof typeof NEWKEY_ARGS; serial: string; days: number; dn: string; ext: string }): Buffer {
  const cnf = join(tmp.path, `${randomBytes(4).toString('hex')}.cnf`);
  writeFileSync(cnf, `[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ext\n[dn]\n${options.dn}\n[ext]\n${options.ext}\n`);
  return openssl(['req', '-x509', '-config', cnf, ...NEWKEY_ARGS[options.key]!, '-nodes', '-keyout', '/dev/null', '-days', String(options.days), '-set_serial', options.serial, '-outform', 'DER']).stdout;
}

/** SHA-1 of the subjectPublicKey bits: what OpenSSL's subjectKeyIdentifier=hash writes. */
function opensslKeyId(spki: Buffer): Buffer {
  return createHash('sha1').update(subjectPublicKeyBits(spki)).digest();
}

function subjectPublicKeyBits(spki: Buffer): Buffer {
  // SPKI = SEQUENCE { AlgorithmIdentifier, BIT STRING }: skip the outer header and the algorithm.
  const outerHeader = spki[1]! & 0x80 ? 2 + (spki[1]! & 0x7f) : 2;
  const alg = outerHeader;
  const algLen = spki[alg + 1]!;
  let at = alg + 2 + algLen;
  assert.equal(spki[at], 0x03);
  const lenByte = spki[at + 1]!;
  const headerLen = lenByte & 0x80 ? 2 + (lenByte & 0x7f) : 2;
  at += headerLen;
  return spki.subarray(at + 1); // past the unused-bits octet
}

describe('parseCertificate of certificates made by openssl req -x509', () => {
  const der = opensslSelfSigned({
    key: 'ecdsa-p256',
    serial: '0x0123456789abcdef',
    days: 30,
    dn: 'CN = Test Device\nO = Acme\nC = DE',
    ext: [
      'basicConstraints = critical, CA:FALSE',
      'keyUsage = critical, digitalSignature, keyAgreement',
      'extendedKeyUsage = clientAuth, serverAuth',
      'subjectKeyIdentifier = hash',
      'authorityKeyIdentifier = keyid:always',
      'subjectAltName = DNS:a.example, IP:10.0.0.1',
    ].join('\n'),
  });
  const cert = parseCertificate(der);
  const node = new NodeX509(der);

  test('version, serial, names, validity', () => {
    assert.equal(cert.version, 3);
    assert.equal(cert.serialHex, '0123456789abcdef');
    assert.equal(cert.serialNegativeOrZero, false);
    assert.equal(node.serialNumber.toLowerCase(), '0123456789abcdef');
    assert.ok(cert.subject.equals(encodeNameString('CN=Test Device,O=Acme,C=DE')));
    assert.ok(cert.issuer.equals(cert.subject));
    assert.equal(nameToString(cert.subject), 'CN=Test Device, O=Acme, C=DE');
    assert.equal(cert.notBefore.getTime(), new Date(node.validFrom).getTime());
    assert.equal(cert.notAfter.getTime(), new Date(node.validTo).getTime());
    assert.equal(cert.notAfter.getTime() - cert.notBefore.getTime(), 30 * 86_400_000);
  });

  test('subject public key and signature: the TBS slice verifies with the key', () => {
    assert.ok(cert.subjectPublicKeyInfo.equals(node.publicKey.export({ type: 'spki', format: 'der' })));
    assert.equal(cert.signatureAlgorithmOid, OID.ecdsaWithSha256);
    assert.ok(cert.tbsSignatureAlgorithm.equals(cert.signatureAlgorithm));
    assert.ok(cryptoVerify('sha256', cert.tbs, node.publicKey, cert.signature));
    assert.equal(sha256Fingerprint(der), node.fingerprint256.replace(/:/g, '').toLowerCase());
  });

  test('extensions: order, criticality and values', () => {
    assert.deepEqual(cert.extensionOrder, [EXT.basicConstraints, EXT.keyUsage, EXT.extKeyUsage, EXT.subjectKeyIdentifier, EXT.authorityKeyIdentifier, EXT.subjectAltName]);
    const get = (oid: string) => cert.extensions.get(oid)!;
    assert.equal(get(EXT.basicConstraints).critical, true);
    assert.deepEqual(decodeBasicConstraints(get(EXT.basicConstraints).value), { ca: false });
    assert.equal(get(EXT.keyUsage).critical, true);
    assert.deepEqual(decodeKeyUsage(get(EXT.keyUsage).value), ['digitalSignature', 'keyAgreement']);
    assert.equal(get(EXT.extKeyUsage).critical, false);
    assert.deepEqual(decodeOidSequence(get(EXT.extKeyUsage).value, 'EKU'), [EKU.clientAuth, EKU.serverAuth]);
    const ski = decodeSubjectKeyId(get(EXT.subjectKeyIdentifier).value);
    assert.ok(ski.equals(opensslKeyId(cert.subjectPublicKeyInfo)));
    assert.ok(decodeAuthorityKeyId(get(EXT.authorityKeyIdentifier).value)!.equals(ski));
    assert.equal(node.subjectAltName, 'DNS:a.example, IP Address:10.0.0.1');
  });

  test('a serial with the top bit set keeps its sign octet; the canonical hex drops it', () => {
    const c = parseCertificate(opensslSelfSigned({ key: 'ecdsa-p256', serial: '0x80', days: 1, dn: 'CN = s', ext: 'basicConstraints = critical, CA:FALSE' }));
    assert.equal(c.serialHex, '0080');
    assert.equal(c.serialNegativeOrZero, false);
    assert.equal(serialToHex(Buffer.from(c.serialHex, 'hex')), '80');
    assert.equal(normaliseSerialHex('00:80'), '80');
    assert.equal(normaliseSerialHex('0x80'.slice(2)), '80');
    assert.equal(normaliseSerialHex('ABC'), '0abc');
    assert.throws(() => normaliseSerialHex('xyz'), hasCode('BAD_REQUEST'));
  });

  test('a CA certificate with pathlen, valid past 2049 (GeneralizedTime notAfter)', () => {
    const c = parseCertificate(opensslSelfSigned({
      key: 'rsa-2048', serial: '7', days: 12000, dn: 'CN = Old Root\nO = Acme',
      ext: 'basicConstraints = critical, CA:TRUE, pathlen:3\nkeyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash',
    }));
    const n = new NodeX509(c.der);
    assert.ok(c.notAfter.getUTCFullYear() >= 2050);
    assert.equal(c.notAfter.getTime(), new Date(n.validTo).getTime());
    assert.deepEqual(decodeBasicConstraints(c.extensions.get(EXT.basicConstraints)!.value), { ca: true, pathLen: 3 });
    assert.deepEqual(decodeKeyUsage(c.extensions.get(EXT.keyUsage)!.value).sort(), ['cRLSign', 'keyCertSign']);
    assert.equal(c.signatureAlgorithmOid, OID.sha256WithRsa);
    assert.ok(cryptoVerify('sha256', c.tbs, n.publicKey, c.signature));
  });

  test('Ed25519 certificates', () => {
    const c = parseCertificate(opensslSelfSigned({ key: 'ed25519', serial: '0x01', days: 1, dn: 'CN = ed', ext: 'basicConstraints = critical, CA:FALSE' }));
    assert.equal(c.signatureAlgorithmOid, OID.ed25519);
    assert.ok(cryptoVerify(null, c.tbs, new NodeX509(c.der).publicKey, c.signature));
  });

  test('malformed certificates -> BAD_DER; oversize -> INPUT_TOO_LARGE', () => {
    for (const cut of [1, 4, 50, der.length - 1]) assert.throws(() => parseCertificate(der.subarray(0, cut)), hasCode('BAD_DER'), `cut at ${cut}`);
    assert.throws(() => parseCertificate(Buffer.concat([der, Buffer.from([0])])), hasCode('BAD_DER'));
    assert.throws(() => parseCertificate(Buffer.alloc(MAX_CERTIFICATE_BYTES + 1, 0x30)), hasCode('INPUT_TOO_LARGE'));
    for (let i = 0; i < 500; i++) {
      const junk = randomBytes(1 + (i % 200));
      junk[0] = 0x30;
      assert.throws(() => parseCertificate(junk), hasCode('BAD_DER'), junk.toString('hex'));
    }
  });

  test('a certificate with bytes flipped at random never fails with anything but a HallmarkError', () => {
    for (let i = 0; i < 1000; i++) {
      const m = Buffer.from(der);
      m[Math.floor(Math.random() * m.length)]! ^= 1 << Math.floor(Math.random() * 8);
      try {
        parseCertificate(m);
      } catch (err) {
        hasCode('BAD_DER')(err);
      }
    }
  });
});

describe('signCertificate output read by independent parsers (@peculiar/x509, OpenSSL)', () => {
  for (const caAlg of ['ecdsa-p256', 'ecdsa-p384', 'ed25519', 'rsa-2048'] as const satisfies readonly KeyAlgorithm[]) {
    test(`CA ${caAlg}: root and device certificate`, async () => {
      const caSigner = memorySigner(caAlg);
      const caSubject = encodeNameString(`CN=Test Root ${caAlg},O=Acme`);
      const caKeyId = keyIdentifier(caSigner.publicKeySpki);
      const root = await signCertificate(signingCa(caSubject, caKeyId, caSigner), {
        profile: PROFILES.root, subject: caSubject, subjectPublicKeyInfo: caSigner.publicKeySpki, subjectKeyKind: caAlg,
      }, true);

      const device = generateKey('ecdsa-p256');
      const deviceSpki = spkiOf(device.publicKey);
      const before = Date.now();
      const leaf = await signCertificate(signingCa(caSubject, caKeyId, caSigner, root.parsed.notAfter), {
        profile: PROFILES.device,
        subject: encodeNameString('CN=sensor-7,O=Acme,C=DE'),
        subjectPublicKeyInfo: deviceSpki,
        subjectKeyKind: 'ecdsa-p256',
        altNames: { dns: ['sensor-7.example'], ip: ['10.0.0.7', '2001:db8::7'], uri: ['urn:dev:sensor-7'], email: ['ops@example.com'] },
      });

      // @peculiar/x509 sees the same serial, names, validity and extensions as our reader.
      const p = new x509.X509Certificate(new Uint8Array(leaf.der));
      assert.equal(p.serialNumber.toLowerCase(), leaf.serialHex);
      assert.equal(p.subject, 'CN=sensor-7, O=Acme, C=DE');
      assert.equal(p.issuer, `CN=Test Root ${caAlg}, O=Acme`);
      assert.equal(p.notBefore.getTime(), leaf.parsed.notBefore.getTime());
      assert.equal(p.notAfter.getTime(), leaf.parsed.notAfter.getTime());
      assert.ok(Math.abs(leaf.parsed.notBefore.getTime() - (before - 5 * 60_000)) < 5_000, 'notBefore is backdated 5 minutes');
      assert.equal(leaf.parsed.notAfter.getTime() - leaf.parsed.notBefore.getTime(), 365 * 86_400_000);
      assert.deepEqual([...p.extensions].map((e) => e.type), leaf.parsed.extensionOrder);
      for (const e of p.extensions) {
        const ours = leaf.parsed.extensions.get(e.type)!;
        assert.equal(e.critical, ours.critical, e.type);
        assert.ok(Buffer.from(e.value).equals(ours.value), e.type);
      }
      const bc = p.getExtension(x509.BasicConstraintsExtension)!;
      assert.equal(bc.ca, false);
      assert.equal(bc.critical, true);
      const ku = p.getExtension(x509.KeyUsagesExtension)!;
      assert.equal(ku.usages, x509.KeyUsageFlags.digitalSignature);
      assert.equal(ku.critical, true);
      assert.deepEqual([...p.getExtension(x509.ExtendedKeyUsageExtension)!.usages], [EKU.clientAuth]);
      assert.equal(p.getExtension(x509.SubjectKeyIdentifierExtension)!.keyId, keyIdentifier(deviceSpki).toString('hex'));
      assert.equal(p.getExtension(x509.AuthorityKeyIdentifierExtension)!.keyId, caKeyId.toString('hex'));
      assert.deepEqual(p.getExtension(x509.SubjectAlternativeNameExtension)!.names.toJSON(), [
        { type: 'email', value: 'ops@example.com' },
        { type: 'dns', value: 'sensor-7.example' },
        { type: 'url', value: 'urn:dev:sensor-7' },
        { type: 'ip', value: '10.0.0.7' },
        { type: 'ip', value: '2001:db8::7' },
      ]);
      const pRoot = new x509.X509Certificate(new Uint8Array(root.der));
      assert.equal(pRoot.getExtension(x509.BasicConstraintsExtension)!.ca, true);
      assert.equal(pRoot.getExtension(x509.AuthorityKeyIdentifierExtension)!.keyId, caKeyId.toString('hex'));

      // OpenSSL (through node:crypto and the CLI) checks the signatures and the chain.
      const nodeRoot = new NodeX509(root.der);
      const nodeLeaf = new NodeX509(leaf.der);
      assert.ok(nodeRoot.verify(nodeRoot.publicKey));
      assert.ok(nodeLeaf.verify(nodeRoot.publicKey));
      assert.ok(nodeLeaf.checkIssued(nodeRoot));
      assert.ok(SCHEME_BY_OID.get(leaf.parsed.signatureAlgorithmOid));
      const dir = join(tmp.path, caAlg);
      mkdirSync(dir);
      const files = writePems(dir, { root: root.der, leaf: leaf.der });
      assert.match(opensslVerify(files.root!, undefined, files.leaf!, ['-x509_strict', '-purpose', 'sslclient']), /OK/);
      const text = opensslText(leaf.der);
      assert.match(text, /X509v3 Basic Constraints: critical\s+CA:FALSE/);
      assert.match(text, /X509v3 Key Usage: critical\s+Digital Signature\n/);
      assert.match(text, /X509v3 Extended Key Usage:\s*\n\s+TLS Web Client Authentication\n/);
      assert.match(text, /IP Address:2001:DB8:0:0:0:0:0:7/);
    });
  }
});
