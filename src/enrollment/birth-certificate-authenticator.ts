// Birth certificate: mutual TLS with a certificate issued by a silicon vendor (or the factory) over the
// chip's hardware key. The TLS handshake proved the client holds that key; here the certificate must
// chain to a trusted vendor CA (hallmark vendor add), be valid now, and carry the key registered for a
// device. That device is who asks.

import { HallmarkError } from '../errors.js';
import { parseCertificate } from '../pki/certificate.js';
import { verifyBirthCertificate } from '../registry/birth-certificates.js';
import type { AuthenticatorContext, EnrolmentAuthenticator, EnrolmentIdentity, EnrolmentRequest } from './authenticator.js';

export const birthCertificateAuthenticator: EnrolmentAuthenticator = {
  name: 'birth-certificate',
  presentIn: (request) => request.peerChain.length > 0,
  async authenticate(request: EnrolmentRequest, context: AuthenticatorContext): Promise<EnrolmentIdentity> {
    const [leafDer, ...intermediates] = request.peerChain as [Buffer, ...Buffer[]];
    const leaf = parseCertificate(leafDer);
    const device = await context.registry.deviceByPublicKey(leaf.subjectPublicKeyInfo);
    if (!device) throw new HallmarkError('ENROLMENT_REFUSED', 'no registered device holds the key of the client certificate');
    try {
      const vendor = await verifyBirthCertificate(context.store.db, leafDer, leaf.subjectPublicKeyInfo, new Date(), intermediates);
      return {
        authenticator: 'birth-certificate',
        udid: device.udid,
        provenKeys: [leaf.subjectPublicKeyInfo],
        actor: `device:${device.udid}`,
        details: { authenticator: 'birth-certificate', vendor },
      };
    } catch (err) {
      if (err instanceof HallmarkError && err.code === 'BIRTH_CERT_INVALID') throw new HallmarkError('ENROLMENT_REFUSED', `device ${device.udid}: ${err.message}`);
      throw err;
    }
  },
};
