// Birth certificates: real silicon-vendor device certificates (Infineon OPTIGA Trust M, Microchip
// ATECC608 Trust&GO) checked against the vendor trust store, on SQLite and PostgreSQL.
//
// The vectors live in ../shared/vectors (see their SOURCE.txt); HALLMARK_TEST_VECTORS points elsewhere.

import assert from 'node:assert/strict';
import { X509Certificate, createHash, generateKeyPairSync } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { TestContext } from 'node:test';
import { Authority } from '../../src/authority/authority.js';
import { initAuthority } from '../../src/authority/init.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { addVendorCa, listVendorCas, verifyBirthCertificate } from '../../src/registry/birth-certificates.js';
import type { Store } from '../../src/store/database.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { openssl } from '../pki/fixtures.js';

const VECTORS = process.env.HALLMARK_TEST_VECTORS || resolve(import.meta.dirname, '..', '..', '..', 'test', 'vectors');
const HAVE_VECTORS = existsSync(join(VECTORS, 'infineon', 'samples')) && existsSync(join(VECTORS, 'microchip', 'pytrustplatform'));
const PASSPHRASE = 'birth certificate test passphrase';
const ACTOR = 'cli:test';

const hasCode = (code: ErrorCode, message?: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
  if (message) assert.match(err.message, message);
  return true;
};

const vector = (...path: string[]): string => readFileSync(join(VECTORS, ...path), 'utf8');
/** DER of the (first) certificate in a PEM file. */
const der = (pem: string): Buffer => new X509Certificate(pem).raw;
/** The certificate's key as SPKI DER, read by Node (independently of Hallmark's parser). */
const spkiOf = (pem: string): Buffer => new X509Certificate(pem).publicKey.export({ type: 'spki', format: 'der' });

const INF = {
  eccRoot: () => vector('infineon', 'ca', 'OptigaECCRootCA2.pem'),
  rsaRoot: () => vector('infineon', 'ca', 'OptigaRSARootCA2.pem'),
  ca306: () => vector('infineon', 'ca', 'OptigaTrustEccCA306.pem'),
  ca309: () => vector('infineon', 'ca', 'OptigaTrustRsaCA309.pem'),
  samples: () => readdirSync(join(VECTORS, 'infineon', 'samples')).filter((f) => f.endsWith('.pem')).sort().map((f) => ({ name: f, pem: vector('infineon', 'samples', f) })),
};
const MCHP = {
  root: () => vector('microchip', 'pytrustplatform', 'Crypto_Authentication_Root_CA_002.crt'),
  signer2C00: () => vector('microchip', 'pytrustplatform', 'Crypto_Authentication_Signer_2C00.cer'),
  signer2C10: () => vector('microchip', 'pytrustplatform', 'Crypto_Authentication_Signer_2C10.cer'),
  device2C00: () => vector('microchip', 'pytrustplatform', 'sn01230390B3D1450C01.cer'),
  device2C10: () => vector('microchip', 'pytrustplatform', 'sn0123D26E26E688C901.cer'),
  logSigner: () => vector('microchip', 'pytrustplatform', 'MCHP_manifest_signer_1_Jan2019_July2019.crt'),
};

/** Within every vector's validity (Infineon devices 2023-2043, Microchip 2020-2048). */
const DURING = new Date('2025-06-01T00:00:00Z');

async function initOn(target: StoreTarget, home: string, rootDir: string): Promise<void> {
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: 'Acme Birth', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR, tlsDnsNames: ['ca.test'] }));
}

async function auditCount(store: Store): Promise<number> {
  return Number((await store.db.selectFrom('audit_log').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
}

/** A look-alike "vendor": a self-signed CA with exactly the subject of Microchip's root, and a device certificate under it. */
function counterfeit(dir: string): { rootPem: string; devicePem: string } {
  const subj = '/O=Microchip Technology Inc/CN=Crypto Authentication Root CA 002';
  const caKey = join(dir, 'fake-root.key');
  const devKey = join(dir, 'fake-dev.key');
  const ext = join(dir, 'fake.ext');
  openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', caKey]);
  openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', devKey]);
  const rootPem = openssl(['req', '-x509', '-new', '-key', caKey, '-subj', subj, '-days', '3650', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign']).stdout.toString();
  const rootFile = join(dir, 'fake-root.pem');
  writeFileSync(rootFile, rootPem);
  writeFileSync(ext, 'basicConstraints=critical,CA:FALSE\n');
  const csr = openssl(['req', '-new', '-key', devKey, '-subj', '/O=Microchip Technology Inc/CN=sn0123FFFFFFFFFFFF01']).stdout;
  const devicePem = openssl(['x509', '-req', '-CA', rootFile, '-CAkey', caKey, '-set_serial', '7', '-days', '365', '-extfile', ext], csr).stdout.toString();
  return { rootPem, devicePem };
}


forEachDialect('birth certificates', async (t: TestContext, target: StoreTarget) => {
  if (!HAVE_VECTORS) {
    assert.ok(process.env.CI !== 'true', `vendor vectors are required under CI=true (not found at ${VECTORS})`);
    t.skip(`vendor vectors not found at ${VECTORS} (set HALLMARK_TEST_VECTORS)`);
    return;
  }
  const home = join(target.dir, 'home');
  await initOn(target, home, join(target.dir, 'root'));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const store = authority.store;
  const observer = await target.openStore();
  try {
    await t.test('addVendorCa refuses a certificate that is not a CA (BAD_REQUEST) and a file without one (BAD_PEM); nothing is stored', async () => {
      const audits = await auditCount(observer);
      await assert.rejects(addVendorCa(store, { vendor: 'microchip', pem: MCHP.device2C00(), actor: ACTOR }), hasCode('BAD_REQUEST', /not a CA/));
      await assert.rejects(addVendorCa(store, { vendor: 'microchip', pem: MCHP.logSigner(), actor: ACTOR }), hasCode('BAD_REQUEST'), 'a self-signed CA:FALSE signer');
      await assert.rejects(addVendorCa(store, { vendor: 'microchip', pem: MCHP.root() + MCHP.device2C00(), actor: ACTOR }), hasCode('BAD_REQUEST'), 'one non-CA among CAs');
      await assert.rejects(addVendorCa(store, { vendor: 'microchip', pem: 'no certificate here', actor: ACTOR }), hasCode('BAD_PEM'));
      await assert.rejects(addVendorCa(store, { vendor: 'bad vendor', pem: MCHP.root(), actor: ACTOR }), hasCode('BAD_REQUEST'), 'vendor name');
      assert.deepEqual(await listVendorCas(observer.db), []);
      assert.equal(await auditCount(observer), audits);
    });

    await t.test('with no vendor trusted, a birth certificate cannot be checked -> BIRTH_CERT_INVALID', async () => {
      const pem = MCHP.device2C00();
      await assert.rejects(verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(MCHP.signer2C00())]), hasCode('BIRTH_CERT_INVALID'));
    });

    await t.test('Infineon OPTIGA Trust M device certificates (ECC via CA 306, RSA via CA 309) verify against the Infineon roots', async () => {
      assert.equal(await addVendorCa(store, { vendor: 'infineon', pem: INF.eccRoot() + INF.rsaRoot(), actor: ACTOR }), 2);
      const audits = await auditCount(observer);
      assert.equal(await addVendorCa(store, { vendor: 'infineon', pem: INF.eccRoot(), actor: ACTOR }), 0, 'adding a CA twice adds nothing');
      assert.equal(await auditCount(observer), audits);
      assert.deepEqual((await listVendorCas(observer.db)).map((c) => [c.vendor, c.subject.includes('ECC Root CA 2') || c.subject.includes('RSA Root CA 2')]), [['infineon', true], ['infineon', true]]);
      const intermediates = [der(INF.ca306()), der(INF.ca309())];
      const samples = INF.samples();
      assert.equal(samples.length, 9);
      for (const { name, pem } of samples) {
        assert.equal(await verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, intermediates), 'infineon', name);
        // The vendor intermediate is needed: the device certificate alone does not reach the root.
        await assert.rejects(verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING), hasCode('BIRTH_CERT_INVALID', /does not chain/), `${name} without its CA`);
      }
    });

    await t.test('a birth certificate from a vendor that is not trusted -> BIRTH_CERT_INVALID, even with its whole chain supplied', async () => {
      const pem = MCHP.device2C00();
      await assert.rejects(verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(MCHP.signer2C00())]), hasCode('BIRTH_CERT_INVALID', /does not chain to a trusted vendor CA/));
      // The vendor's own root passed as "intermediate" does not make it trusted.
      await assert.rejects(verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(MCHP.signer2C00()), der(MCHP.root())]), hasCode('BIRTH_CERT_INVALID'));
    });

    await t.test('a vendor CA added after a check is trusted by the next check on the same database handle (no stale trust-anchor cache)', async () => {
      const pem = MCHP.device2C00();
      await assert.rejects(verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(MCHP.signer2C00())]), hasCode('BIRTH_CERT_INVALID'));
      assert.equal(await addVendorCa(store, { vendor: 'microchip', pem: MCHP.root(), actor: ACTOR }), 1);
      assert.equal(await verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(MCHP.signer2C00())]), 'microchip');
    });

    await t.test('Microchip ATECC608 device certificates verify through their signer CA to Crypto Authentication Root CA 002', async () => {
      for (const [pem, signer] of [[MCHP.device2C00(), MCHP.signer2C00()], [MCHP.device2C10(), MCHP.signer2C10()]] as const) {
        assert.equal(await verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(signer)]), 'microchip');
        // Extra, unrelated chain certificates do no harm.
        assert.equal(await verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(INF.ca306()), der(MCHP.signer2C00()), der(MCHP.signer2C10())]), 'microchip');
      }
      // The wrong signer (same vendor) is no chain.
      const pem = MCHP.device2C00();
      await assert.rejects(verifyBirthCertificate(store.db, der(pem), spkiOf(pem), DURING, [der(MCHP.signer2C10())]), hasCode('BIRTH_CERT_INVALID'));
      // Trusting the signer CA itself is enough (a vendor may be trusted at the signer level).
      assert.equal(await addVendorCa(store, { vendor: 'microchip', pem: MCHP.signer2C10(), actor: ACTOR }), 1);
      const other = MCHP.device2C10();
      assert.equal(await verifyBirthCertificate(store.db, der(other), spkiOf(other), DURING), 'microchip');
    });

    await t.test('a look-alike CA with the trusted root name but another key is not trusted -> BIRTH_CERT_INVALID', async () => {
      const fake = counterfeit(target.dir);
      await assert.rejects(verifyBirthCertificate(store.db, der(fake.devicePem), spkiOf(fake.devicePem), new Date(), [der(fake.rootPem)]), hasCode('BIRTH_CERT_INVALID'));
      await assert.rejects(verifyBirthCertificate(store.db, der(fake.devicePem), spkiOf(fake.devicePem), new Date()), hasCode('BIRTH_CERT_INVALID'));
    });

    await t.test('a birth certificate over a key other than the registered one -> BIRTH_CERT_INVALID', async () => {
      const [e0e0, e0e1] = INF.samples().filter((s) => s.name.startsWith('0A091B5C001500070063_'));
      const chain = [der(INF.ca306())];
      await assert.rejects(verifyBirthCertificate(store.db, der(e0e0!.pem), spkiOf(e0e1!.pem), DURING, chain), hasCode('BIRTH_CERT_INVALID', /registered public key/));
      const stranger = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
      await assert.rejects(verifyBirthCertificate(store.db, der(e0e0!.pem), stranger, DURING, chain), hasCode('BIRTH_CERT_INVALID'));
      await assert.rejects(verifyBirthCertificate(store.db, der(MCHP.device2C00()), spkiOf(MCHP.device2C10()), DURING, [der(MCHP.signer2C00())]), hasCode('BIRTH_CERT_INVALID'));
    });

    await t.test('a birth certificate checked outside its validity (after notAfter, before notBefore) -> BIRTH_CERT_INVALID', async () => {
      const mchp = MCHP.device2C00(); // valid 2020-06-09 .. 2048-06-09
      const inf = INF.samples()[0]!.pem; // valid 2023-06-01 .. 2043-06-01
      const cases: Array<[string, string, Date, Buffer[]]> = [
        ['Microchip after notAfter', mchp, new Date('2049-01-01T00:00:00Z'), [der(MCHP.signer2C00())]],
        ['Microchip one second after notAfter', mchp, new Date(new Date(new X509Certificate(mchp).validTo).getTime() + 1000), [der(MCHP.signer2C00())]],
        ['Microchip before notBefore', mchp, new Date('2020-01-01T00:00:00Z'), [der(MCHP.signer2C00())]],
        ['Infineon after notAfter', inf, new Date('2044-01-01T00:00:00Z'), [der(INF.ca306()), der(INF.ca309())]],
      ];
      for (const [name, pem, at, chain] of cases) {
        await assert.rejects(verifyBirthCertificate(store.db, der(pem), spkiOf(pem), at, chain), hasCode('BIRTH_CERT_INVALID', /not valid at/), name);
      }
      // One second before notAfter it still verifies: the boundary is the certificate's own.
      const lastSecond = new Date(new Date(new X509Certificate(mchp).validTo).getTime() - 1000);
      assert.equal(await verifyBirthCertificate(store.db, der(mchp), spkiOf(mchp), lastSecond, [der(MCHP.signer2C00())]), 'microchip');
    });

    await t.test('registering a device with a valid birth certificate stores it; an invalid one stores nothing', async () => {
      const registry = authority.registry;
      await registry.createProduct({ name: 'trust-m-board', actor: ACTOR });
      await registry.createLine({ name: 'line-b', ca: 'issuing-1', actor: ACTOR });
      const batch = await registry.createBatch({ product: 'trust-m-board', line: 'line-b', quota: 10, actor: ACTOR });
      const [e0e0, e0e1, e0e2] = INF.samples().filter((s) => s.name.startsWith('0A091B5C0015000C0069_'));
      for (const s of [e0e0!, e0e2!]) {
        const spki = spkiOf(s.pem);
        const device = await registry.registerDevice(batch, { publicKeySpki: spki, serialNumber: s.name.slice(0, 20), birthCertificate: der(s.pem), birthCertificateChain: [der(INF.ca306()), der(INF.ca309())] }, ACTOR);
        assert.equal(device.hasBirthCertificate, true, s.name);
        assert.equal(device.udid, createHash('sha256').update(spki).digest('hex'));
        const row = await observer.db.selectFrom('devices').select('birth_cert_der').where('udid', '=', device.udid).executeTakeFirstOrThrow();
        assert.ok(row.birth_cert_der && Buffer.from(row.birth_cert_der).equals(der(s.pem)), 'the birth certificate itself is stored');
        const audit = await observer.db.selectFrom('audit_log').select('details').where('action', '=', 'device.register').where('target', '=', device.udid).executeTakeFirstOrThrow();
        assert.equal(JSON.parse(audit.details).birthCertificate, true);
      }
      // A Microchip device, trusted at the signer level above: no chain needed.
      const m = MCHP.device2C10();
      assert.equal((await registry.registerDevice(batch, { publicKeySpki: spkiOf(m), birthCertificate: der(m) }, ACTOR)).hasBirthCertificate, true);
      // Without a birth certificate the device is registered without one.
      const plain = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
      assert.equal((await registry.registerDevice(batch, { publicKeySpki: plain }, ACTOR)).hasBirthCertificate, false);

      const devices = (await registry.batch(batch)).registered;
      const audits = await auditCount(observer);
      const fake = counterfeit(target.dir);
      const bad: Array<[string, Parameters<typeof registry.registerDevice>[1]]> = [
        ['the birth certificate of another chip', { publicKeySpki: spkiOf(e0e1!.pem), birthCertificate: der(e0e0!.pem), birthCertificateChain: [der(INF.ca306())] }],
        ['its vendor CA missing from the chain', { publicKeySpki: spkiOf(e0e1!.pem), birthCertificate: der(e0e1!.pem) }],
        ['a counterfeit vendor', { publicKeySpki: spkiOf(fake.devicePem), birthCertificate: der(fake.devicePem), birthCertificateChain: [der(fake.rootPem)] }],
        ['garbage', { publicKeySpki: spkiOf(e0e1!.pem), birthCertificate: Buffer.from('3000', 'hex') }],
      ];
      for (const [name, reg] of bad) await assert.rejects(registry.registerDevice(batch, reg, ACTOR), hasCode('BIRTH_CERT_INVALID'), name);
      // In a list, one bad birth certificate refuses the whole list.
      await assert.rejects(registry.registerDevices(batch, [{ publicKeySpki: generateKeyPairSync('ed25519').publicKey.export({ type: 'spki', format: 'der' }) }, bad[0]![1]], ACTOR), hasCode('BIRTH_CERT_INVALID', /entry 2/));
      assert.equal((await registry.batch(batch)).registered, devices);
      assert.equal(await auditCount(observer), audits);
    });
  } finally {
    await authority.close();
  }
}, { timeout: 120_000 });
