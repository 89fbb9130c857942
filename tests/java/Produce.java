// A producer that is not aiokafka: the official Apache Kafka Java client, from the broker's own jars.
//
//   java -cp '.cache/kafka/<version>/libs/*' tests/java/Produce.java BOOTSTRAP TOPIC CODECS FILE...
//
// For each codec of the comma-separated CODECS (none, gzip, snappy, lz4, zstd) one producer with
// compression.type=CODEC sends every FILE as a record value (key "cam-<i>", header camera-id), with
// acks=all and a linger, so that several records share each compressed batch. Prints one line per
// acknowledged record: "CODEC PARTITION OFFSET". Exits non-zero on any failed send.
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.Future;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class Produce {
    public static void main(String[] args) throws Exception {
        if (args.length < 4) {
            System.err.println("usage: Produce BOOTSTRAP TOPIC CODECS FILE...");
            System.exit(2);
        }
        List<byte[]> values = new ArrayList<>();
        for (int i = 3; i < args.length; i++) {
            values.add(Files.readAllBytes(Path.of(args[i])));
        }
        for (String codec : args[2].split(",")) {
            Properties props = new Properties();
            props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
            props.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, codec);
            props.put(ProducerConfig.ACKS_CONFIG, "all");
            props.put(ProducerConfig.LINGER_MS_CONFIG, "50");
            props.put(ProducerConfig.MAX_REQUEST_SIZE_CONFIG, String.valueOf(16 * 1024 * 1024));
            props.put(ProducerConfig.CLIENT_ID_CONFIG, "camera-gateway-" + codec);
            try (KafkaProducer<byte[], byte[]> producer =
                     new KafkaProducer<>(props, new ByteArraySerializer(), new ByteArraySerializer())) {
                List<Future<RecordMetadata>> sent = new ArrayList<>();
                for (int i = 0; i < values.size(); i++) {
                    byte[] camera = ("cam-" + i).getBytes();
                    ProducerRecord<byte[], byte[]> record = new ProducerRecord<>(args[1], camera, values.get(i));
                    record.headers().add("camera-id", camera);
                    sent.add(producer.send(record));
                }
                producer.flush();
                for (Future<RecordMetadata> f : sent) {
                    RecordMetadata m = f.get();
                    System.out.println(codec + " " + m.partition() + " " + m.offset());
                }
            }
        }
    }
}
