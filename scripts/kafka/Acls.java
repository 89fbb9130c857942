// Grant ACLs on the local broker with the Apache Kafka Admin client (used by `kafka-local acl`).
//
//   java -cp '.cache/kafka/<version>/libs/*' scripts/kafka/Acls.java BOOTSTRAP SPEC...
//
// SPEC is PRINCIPAL,OPERATION,RESOURCE_TYPE,NAME[,PATTERN]: e.g. User:shelfmatch,READ,TOPIC,shelf.photos
// or User:shelfmatch,WRITE,TRANSACTIONAL_ID,shelfmatch.,PREFIXED (PATTERN: LITERAL, the default, or
// PREFIXED). Every SPEC is an ALLOW from any host. Returns once the controller has accepted them all.
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class Acls {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: Acls BOOTSTRAP PRINCIPAL,OPERATION,RESOURCE_TYPE,NAME[,PATTERN]...");
            System.exit(2);
        }
        List<AclBinding> bindings = new ArrayList<>();
        for (int i = 1; i < args.length; i++) {
            String[] f = args[i].split(",");
            if (f.length < 4 || f.length > 5) {
                System.err.println("bad ACL spec: " + args[i]);
                System.exit(2);
            }
            PatternType pattern = f.length == 5 ? PatternType.fromString(f[4]) : PatternType.LITERAL;
            ResourcePattern resource = new ResourcePattern(ResourceType.fromString(f[2]), f[3], pattern);
            AccessControlEntry entry =
                new AccessControlEntry(f[0], "*", AclOperation.fromString(f[1]), AclPermissionType.ALLOW);
            if (resource.resourceType() == ResourceType.UNKNOWN || entry.operation() == AclOperation.UNKNOWN
                    || pattern == PatternType.UNKNOWN) {
                System.err.println("unknown resource type, operation or pattern in: " + args[i]);
                System.exit(2);
            }
            bindings.add(new AclBinding(resource, entry));
        }
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        try (Admin admin = Admin.create(props)) {
            admin.createAcls(bindings).all().get();
        }
        for (AclBinding b : bindings) {
            System.out.println("granted " + b);
        }
    }
}
